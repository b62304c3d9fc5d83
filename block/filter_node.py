"""What every filter node forwards to the node below it (``file``): QEMU's filters (copy-before-write,
copy-on-read, snapshot-access, throttle) have no image of their own, so their name for messages, their
read-only state and their capabilities are the child's, and graph walkers find the child as
``filtered_child``. Filters inherit these from :class:`FilterOverFile` instead of each spelling them out.
"""

from __future__ import annotations

from pyemu.block.driver import BlockCapabilities, BlockDriver


class FilterOverFile:
    """Base of a filter whose child is ``self.file`` (set by the subclass before use)."""

    file: BlockDriver

    @property
    def filtered_child(self) -> BlockDriver:
        """The node below: reads go there (and its dirty bitmaps record the writes that pass the filter)."""
        return self.file

    @property
    def filename(self) -> str:
        return self.file.filename

    @property
    def read_only(self) -> bool:
        return self.file.read_only

    @property
    def capabilities(self) -> BlockCapabilities:
        return self.file.capabilities
