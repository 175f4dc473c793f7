"""LR range test: train with an exponentially growing learning rate and watch where the loss falls fastest."""

from __future__ import annotations

import json
import math
from pathlib import Path

from memory_transformer.config import Config
from memory_transformer.train.optim import lr_range
from memory_transformer.train.trainer import Trainer


def lr_find(cfg: Config, out_dir: str | Path, start: float = 1e-6, end: float = 1.0, steps: int = 100,
            progress: bool = True) -> dict:
    """Run `steps` steps from lr `start` to `end` (every group gets the same lr), stop once the smoothed loss
    passes 4x its minimum. Suggest the lr of the steepest descent of the smoothed loss; write
    lr_find.json and lr_find.png to `out_dir`."""
    trainer = Trainer(cfg, progress=False, run_dir=False)
    lrs, losses, smooth, best, avg = lr_range(start, end, steps), [], [], math.inf, 0.0
    for i, lr in enumerate(lrs):
        for g in trainer.optimizer.param_groups:
            g["lr"] = lr
        loss = trainer.loss_and_gradients()["loss"]
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        avg = 0.98 * avg + 0.02 * loss
        smooth.append(avg / (1 - 0.98 ** (i + 1)))  # bias-corrected exponential average
        losses.append(loss)
        best = min(best, smooth[-1])
        if progress:
            print(f"lr {lr:.2e}  loss {loss:.4f}  smoothed {smooth[-1]:.4f}")
        if not math.isfinite(loss) or smooth[-1] > 4 * best:
            break
    tried = lrs[: len(smooth)]
    result = {"suggested_lr": _steepest(tried, smooth), "lr": tried, "loss": losses, "smoothed_loss": smooth}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.json").write_text(json.dumps(result))
    _plot(result, out / "lr_find.png")
    return result


def _steepest(lrs: list[float], smooth: list[float]) -> float:
    """The lr where d(smoothed loss)/d(log lr) is most negative (ignoring the first and last 10%)."""
    n = len(smooth)
    lo, hi = max(1, n // 10), max(2, n - n // 10)
    slopes = [(smooth[i + 1] - smooth[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1]) for i in range(lo, min(hi, n - 1))]
    if not slopes:
        return lrs[min(range(n), key=smooth.__getitem__)] / 10
    i = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[lo + i]


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lr"], result["loss"], alpha=0.3, label="loss")
    ax.plot(result["lr"], result["smoothed_loss"], label="smoothed")
    ax.axvline(result["suggested_lr"], color="red", linestyle="--", label=f"suggested {result['suggested_lr']:.1e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
