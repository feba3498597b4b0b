"""Benchmarks, one module per thing timed; each returns a JSON-ready dict that `wdmctl bench ...` prints with
the device it ran on (`wdmctl.core.device.write_json`).

    model.py      forward and train-step throughput of a preset
    train.py      one full training step (optionally one CUDA graph, optionally profiled by kernel)
    sample.py     whole sampling runs
    scan.py       the selective scan and causal conv1d per backend
    cache.py      autoencoder encoding throughput
    inception.py  FID Inception throughput
    denoiser.py   one denoiser call per backend: eager PyTorch, ONNX Runtime per export form, TensorRT
"""
