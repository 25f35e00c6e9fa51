"""The teacher-output cache: a teacher's logits for every (epoch, step) of a training plan, computed
once and read by every later run that shares the plan (another student, another logit method, a rerun).

One entry is a folder named by its key (:func:`entry_key`: the teacher's weights, the data, the seed
and the batch plan) holding one file per (epoch, rank): ``epoch00003.rank0of1.safetensors``. A file
holds, for the steps 0..n-1 of that epoch, the encoded logits (:func:`encode`) and a signature of the
batch the teacher saw (:func:`signature`). Files are written atomically when an epoch's steps are done
(or when training stops: the steps computed so far), so a killed run never leaves a file that a later
run trusts; each file carries the SHA-256 of its tensors, checked on every read.

The cache changes what a method trains on in one documented way: the teacher's logits are rounded to
float16 (and, with ``topk``, all but the k largest replaced by their mean) whether they come from a
file or from the teacher, so a run that fills the cache and one that reads it train bit-identically."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch

from compress.fsio import sha256_json, write_bytes, write_json

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the file layout or the encoding changes: every key changes with it
SAMPLES = 8  # single values of the batch that enter its signature, besides its sums
_SIG_RTOL, _SIG_ATOL = 1e-7, 1e-6  # float64 sums may differ in their last bits with the thread count

Encoded = tuple[torch.Tensor, ...]  # (logits,) in float16, or (values, indices, fill) for top-k


def entry_key(ident: dict) -> str:
    """The entry's name: a hash of everything that decides what the teacher sees and outputs, with the
    cache's format, the top-k setting and the torch and timm versions (augmentation and mixing draw
    from their random streams)."""
    import timm

    return sha256_json({"teacher_logits": FORMAT, **ident, "torch": torch.__version__, "timm": timm.__version__})


def encode(logits: torch.Tensor, topk: int | None) -> Encoded:
    """Logits as stored: float16, or with ``topk`` the k largest (float16 values, int16/int32 class
    indices) and the mean of the others (float16), which stands for each of them when decoded, so a
    row keeps its mean (what logit standardization subtracts)."""
    classes = logits.shape[1]
    if topk is None or topk >= classes:
        return (logits.half(),)
    values, indices = logits.topk(topk, dim=1)
    rest = torch.ones_like(logits).scatter_(1, indices, 0.0)
    fill = (logits * rest).sum(1) / (classes - topk)
    return values.half(), indices.to(torch.int16 if classes <= 2**15 else torch.int32), fill.half()


def decode(enc: Encoded, classes: int, device: torch.device) -> torch.Tensor:
    """The float32 logits of :func:`encode`'s output, on ``device``: pure conversion and placement, so
    a stored entry decodes to the very tensor its run trained on."""
    enc = tuple(t.to(device, non_blocking=True) for t in enc)
    if len(enc) == 1:
        return enc[0].float()
    values, indices, fill = enc
    out = fill.float()[:, None].expand(len(fill), classes).clone()
    return out.scatter_(1, indices.long(), values.float())


def signature(x: torch.Tensor) -> torch.Tensor:
    """A cheap float64 fingerprint of a batch, to check that a stored step saw this very batch: its
    size, the sum and the absolute sum, the per-image sums weighted by position (a reordered batch
    differs) and ``SAMPLES`` single values spread over it."""
    flat = x.detach().reshape(len(x), -1)
    per_image = flat.sum(1, dtype=torch.float64)
    weights = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
    picks = flat.flatten()[torch.linspace(0, flat.numel() - 1, SAMPLES, device=x.device).long()].double()
    size = torch.tensor([len(x), flat.shape[1]], dtype=torch.float64, device=x.device)
    sums = torch.stack([per_image.sum(), flat.abs().sum(dtype=torch.float64), (per_image * weights).sum()])
    return torch.cat([size, sums, picks]).cpu()


class Damaged(Exception):
    """A cache file that cannot be trusted (truncated, altered, of another entry)."""


class TeacherLogitCache:
    """One teacher's entry as a training run uses it, one epoch at a time.

    ``start_epoch(e)`` stores the previous epoch's new steps and reads epoch ``e``'s file (a damaged
    one is reported and computed again); ``logits(x, teacher)`` answers the epoch's next step from the
    file when its signature matches, else from ``teacher`` (kept for the file); ``flush()`` stores what
    is new. A batch that differs from the stored one means the key misses something that changed the
    batches: one warning, and the teacher answers for the rest of the run with nothing more stored.
    Under DDP each rank keeps its own files (``rank``, ``world``): entries are rank-local."""

    def __init__(self, folder: Path, *, topk: int | None = None, rank: int = 0, world: int = 1,
                 read: bool = True, describe: dict | None = None):
        self.folder, self.topk, self.rank, self.world, self.read = folder, topk, rank, world, read
        self.describe = describe or {}
        self.stats = {"steps_read": 0, "steps_computed": 0, "fell_back": False}
        self._epoch: int | None = None
        self._steps: list[tuple[torch.Tensor, Encoded]] = []  # (signature, encoded logits) of steps 0..n-1
        self._new = False  # steps computed since the epoch's file was read
        self._step = 0
        self._classes = 0
        self._live = False  # a batch differed from the stored one: the teacher answers from then on
        self._storing = True  # off after a failed write

    @property
    def key(self) -> str:
        return self.folder.name

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch:05d}.rank{self.rank}of{self.world}.safetensors"

    def start_epoch(self, epoch: int) -> None:
        self.flush()
        self._epoch, self._step, self._new = epoch, 0, False
        self._steps = self._load(epoch) if self.read and not self._live else []

    def logits(self, x: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for ``x``, the epoch's next step, as :func:`encode` stores them."""
        if self._epoch is None:
            raise RuntimeError("TeacherLogitCache.start_epoch() must come before logits()")
        step, self._step = self._step, self._step + 1
        sig = signature(x)
        if step < len(self._steps) and not self._live:
            want, enc = self._steps[step]
            if torch.allclose(sig, want, rtol=_SIG_RTOL, atol=_SIG_ATOL):
                self.stats["steps_read"] += 1
                return decode(enc, self._classes, x.device)
            log.warning(f"teacher-logit cache {self.key[:12]}: the batch of epoch {self._epoch + 1} step {step + 1} "
                        "is not the one stored (the batch plan changed in a way the key does not capture); "
                        "using the live teacher for the rest of this run")
            self._live, self.stats["fell_back"] = True, True
        out = teacher(x)
        self._classes = out.shape[1]
        enc = encode(out, self.topk)
        self.stats["steps_computed"] += 1
        if not self._live and step == len(self._steps):
            self._steps.append((sig, tuple(t.cpu() for t in enc)))
            self._new = True
        return decode(enc, self._classes, x.device)

    def flush(self) -> None:
        """Store the current epoch's steps if some were computed; a failed write is reported and ends
        storing (training goes on)."""
        if not self._new or not self._storing:
            return
        self._new = False
        try:
            if not (self.folder / "key.json").is_file():
                write_json(self.folder / "key.json", self.describe)
            write_bytes(self.path(self._epoch), self._serialize())
        except OSError as e:
            log.warning(f"teacher-logit cache {self.key[:12]}: cannot store epoch {self._epoch + 1} "
                        f"({e.strerror or e}); training goes on without storing")
            self._storing = False

    def _serialize(self) -> bytes:
        from safetensors.torch import save

        sizes = [len(enc[0]) for _, enc in self._steps]
        tensors = {"signatures": torch.stack([sig for sig, _ in self._steps]),
                   "offsets": torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)}
        names = ("logits",) if len(self._steps[0][1]) == 1 else ("values", "indices", "fill")
        for i, name in enumerate(names):
            tensors[name] = torch.cat([enc[i] for _, enc in self._steps])
        meta = {"format": str(FORMAT), "key": self.key, "epoch": str(self._epoch), "rank": str(self.rank),
                "world": str(self.world), "classes": str(self._classes), "topk": str(self.topk),
                "sha256": _payload_hash(tensors)}
        return save(tensors, metadata=meta)

    def _load(self, epoch: int) -> list[tuple[torch.Tensor, Encoded]]:
        path = self.path(epoch)
        if not path.is_file():
            return []
        try:
            steps, self._classes = _parse(path, {"format": str(FORMAT), "key": self.key,
                                          "epoch": str(epoch), "rank": str(self.rank), "world": str(self.world),
                                          "topk": str(self.topk)})
        except (Damaged, OSError) as e:
            log.warning(f"teacher-logit cache file {path} is damaged ({e}); computing its logits again")
            return []
        return steps

    def summary(self) -> str:
        s = self.stats
        return (f"teacher-logit cache {self.key[:12]}: {s['steps_read']} steps read, {s['steps_computed']} computed"
                + (" (fell back to the live teacher)" if s["fell_back"] else ""))


def _payload_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _parse(path: Path, expect: dict[str, str]) -> tuple[list[tuple[torch.Tensor, Encoded]], int]:
    """The steps of a cache file and its number of classes; raises :class:`Damaged` unless the file
    is whole, unaltered and of the entry, epoch and rank in ``expect``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - a torn or altered file fails in the parser's own ways
        raise Damaged(f"unreadable: {str(e)[:80]}") from None
    for k, v in expect.items():
        if meta.get(k) != v:
            raise Damaged(f"{k} is {meta.get(k)!r}, not {v!r}")
    if _payload_hash(tensors) != meta.get("sha256"):
        raise Damaged("its content does not match its SHA-256")
    offsets, sigs = tensors["offsets"].tolist(), tensors["signatures"]
    parts = [tensors[n] for n in (("logits",) if "logits" in tensors else ("values", "indices", "fill"))]
    if len(offsets) != len(sigs) + 1 or any(len(p) != offsets[-1] for p in parts):
        raise Damaged("its tables disagree in length")
    steps = [(sigs[i], tuple(p[offsets[i] : offsets[i + 1]] for p in parts)) for i in range(len(sigs))]
    return steps, int(meta["classes"])
