"""The qcow2 format: header (:mod:`.header`), table encoding (:mod:`.layout`), cluster mapping
(:mod:`.mapping`), refcounts and allocation (:mod:`.refcount`), snapshots, check/repair, resize/amend,
creation, and the I/O path (:mod:`.driver`). Import the submodule you need; nothing runs at import time."""
