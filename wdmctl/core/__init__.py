"""The ground floor: helpers every other part of wdmctl may use and that use nothing of wdmctl but errors.

    io.py           atomic file writes (JSON, bytes, any writer)
    hashing.py      sha256 of files, of JSON values and of state dicts
    integrity.py    size + sha256 of written files (integrity.json), checked on read; one-line CorruptFile errors
    disk_full.py    a failed write (a full disk) as one line: the file, the free space, what is still safe
    timing.py       CUDA-event timing, peak memory, kernel profiles
    device.py       what a benchmark ran on
    precision.py    the one precision vocabulary (fp32, bf16, fp16)
    cuda_graphs.py  side-stream warm-up and capture, shared by sampling and training
    version.py      the package version
"""
