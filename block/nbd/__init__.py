"""NBD for pyemu: the wire protocol, a server for exports of block nodes, and the ``nbd`` client driver."""
