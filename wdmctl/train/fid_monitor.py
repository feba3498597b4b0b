"""FID during training (`[fid] every` steps): FID-K of the EMA weights (K = `[fid] every_num`) against the
recipe's reference, with the same images' stripe score (wdmctl/fid/stripes.py), written to stats.jsonl and TensorBoard, so one run gives a curve against steps, images
seen and training time (`wdmctl report` draws it).

The samples are the same every time (seeds 0..K-1, the sampler's random classes for those seeds, the
recipe's `[fid]` steps, guidance and solver), so two points of a curve differ only by the weights. The
Inception network, the reference statistics and the autoencoder are loaded once, at the first measurement.
Only the main process measures; the others wait for it.
"""

from __future__ import annotations

import time
from typing import Any

from wdmctl import config as cfg
from wdmctl.diffusion.sampler import Decoder, iter_sample_batches
from wdmctl.diffusion.settings import labels_for
from wdmctl.fid.inception import load_inception
from wdmctl.fid.reference import resolve_reference
from wdmctl.fid.score import score_images
from wdmctl.fid.stripes import StripeMeter


class FidMonitor:
    """Periodic FID of the EMA weights; `due(step)` says when, `measure` returns the stats record."""

    def __init__(self, recipe: cfg.Recipe, manifest: dict[str, Any], device, precision: str):
        self.recipe, self.manifest, self.device, self.precision = recipe, manifest, device, precision
        self.extractor = self.reference = self.decoder = None

    def due(self, step: int, last: bool) -> bool:
        every = self.recipe.fid.every
        return bool(every) and (step % every == 0 or last)

    def _load(self) -> None:
        f = self.recipe.fid
        self.extractor = load_inception(f.inception or None, str(self.device))
        self.reference = resolve_reference(f.ref, f.resolution or self.manifest.get("resolution"),
                                           extractor=self.extractor, device=str(self.device))
        self.decoder = Decoder(self.manifest["autoencoder"], self.device)

    def measure(self, ema_model, scheduler_config: dict, step: int, images_seen: int) -> dict[str, Any]:
        """Sample K images from the EMA model and score them; the record for stats.jsonl."""
        if self.extractor is None:
            self._load()
        f = self.recipe.fid
        started = time.perf_counter()
        seeds = list(range(f.every_num))
        labels = labels_for(seeds, "random" if ema_model.config.num_classes else None, ema_model.config.num_classes)
        was_training = ema_model.training
        ema_model.eval()
        try:
            batches = iter_sample_batches(ema_model, scheduler_config, self.manifest["autoencoder"], seeds, labels,
                                          steps=f.steps, cfg=f.cfg, solver=f.solver, batch_size=f.every_batch_size,
                                          device=self.device, precision=self.precision, decoder=self.decoder)
            stripes = StripeMeter()   # the same images' stripe score (wdmctl/fid/stripes.py), beside the FID
            result = score_images(stripes.tap(batches), self.reference, num_expected=f.every_num,
                                  extractor=self.extractor)
        finally:
            ema_model.train(was_training)
        return {"step": step, "images_seen": images_seen, "fid": result["fid"], "fid_num": f.every_num,
                "stripes": round(stripes.result()["share"], 6), "fid_seconds": round(time.perf_counter() - started, 2)}
