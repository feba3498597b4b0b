"""Training, along the steps of one run:

    plan.py        which run folder, resume from where (before anything is written)
    trainer.py     `train`: build the model, optimizer, EMA and data stream, resume, hand over to the loop
    loop.py        the step loop and its bookkeeping (logs, checkpoints, grids, stop signal)
    data.py        which images each step reads (seeded by step: exact resume)
    objective.py   loss, AdamW groups, learning-rate schedule, EMA
    graphed.py     a whole step as one CUDA graph
    checkpoint.py  checkpoints: every tensor once, safetensors only; which are intact (resume, pruning)
    report.py      progress bar, log.txt, stats.jsonl;  plot.py: loss.png;  grid.py: EMA sample grids
"""
