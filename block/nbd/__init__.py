"""NBD for pyemu: the wire protocol, a server for exports of block nodes, and the ``nbd`` client driver."""

URL_PREFIXES = ("nbd://", "nbd+unix://", "nbd+tcp://", "nbds://", "nbds+unix://", "nbd:")


def is_nbd_url(filename: str) -> bool:
    """Whether ``filename`` names an NBD export. Here rather than in :mod:`.uri` so that opening a plain
    file (every pyemu-img command) does not import the socket and URL parsing modules."""
    return filename.startswith(URL_PREFIXES)
