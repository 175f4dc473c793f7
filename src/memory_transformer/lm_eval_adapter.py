"""lm-evaluation-harness adapter: evaluate a saved model (memory or vanilla) on any `lm_eval` task.

lm-eval 0.4.13 finds models only in its own registry; it reads no plugin entry points. Importing this module
registers the model as "memory-transformer":

    import lm_eval, memory_transformer.lm_eval_adapter
    lm_eval.simple_evaluate(model="memory-transformer", model_args="pretrained=runs/x/final,batch_size=8",
                            tasks=["hellaswag"])

`memory-transformer eval --checkpoint DIR --lm-eval-tasks T1,T2` does this for you, and
`python -m memory_transformer.lm_eval_adapter run --model memory-transformer --model_args pretrained=DIR ...`
is lm-eval's own command line with the model registered.

Every request is scored on its own: rows are right-padded (the real tokens keep their positions and causal
attention, and the memory router pools non-padding positions only), and the memory's runtime state is cleared
after every batch, so a score depends neither on the other requests of its batch nor on their order.

Which chapters the memory reads while scoring (`routing=`):
- forward (default): the model's forward, as in training and `memory-transformer eval` perplexity. With
  sequence routing, the chapters are chosen from the whole row, continuation included.
- context: the chapters are chosen from the context tokens only, as `generate` does for a prompt (sequence
  routing); the continuation then cannot influence its own routing. Token routing is causal either way.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import lm_eval
import lm_eval.models  # noqa: F401  lm-eval's own models: its registry loads them only while it is empty
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from memory_transformer.config import ConfigError
from memory_transformer.data.tokenizer import left_pad
from memory_transformer.io import load_model
from memory_transformer.model import MemoryModel

SCORE_ROUTINGS = ("forward", "context")
log = logging.getLogger(__name__)


class StopOnStrings(StoppingCriteria):
    """Per row: done once the text generated after the prompt contains one of `stops`."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = [self.tokenizer.decode(row[self.prompt_len:], skip_special_tokens=True) for row in input_ids]
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def cut_at_stops(text: str, stops: list[str]) -> str:
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@register_model("memory-transformer")
class MemoryTransformerLM(TemplateLM):
    """`pretrained`: a folder saved with `save_pretrained` (or a MemoryModel). `max_length`: the longest
    row the model sees (default: the base's `max_position_embeddings`); contexts are cut from the left.
    `max_gen_toks`: generation length when a task gives none. `routing`: forward | context (module doc)."""

    def __init__(self, pretrained: str | Path | MemoryModel, batch_size: int | str = 1, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, routing: str = "forward",
                 max_batch_size: int | None = None):  # max_batch_size: passed by lm-eval, unused (no 'auto')
        super().__init__()
        if routing not in SCORE_ROUTINGS:
            raise ValueError(f"routing: got {routing!r}; allowed: {' | '.join(SCORE_ROUTINGS)}")
        if not str(batch_size).isdigit():
            raise ValueError(f"batch_size: got {batch_size!r}; give a number (no 'auto' for this model)")
        if isinstance(pretrained, MemoryModel):
            self.model, self.name = pretrained.to(device or pretrained.device), type(pretrained).__name__
        else:
            if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI default: cuda:0
                log.warning("device %s: CUDA is not available, using the CPU", device)
                device = None
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model, self.name = load_model(pretrained, device=device), str(pretrained)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = max_length or self.model.base.config.max_position_embeddings
        self.max_gen_toks, self.routing = max_gen_toks, routing
        self._device = self.model.device

    # -- tokens -------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id  # also the prefix of an empty context: training separates docs by EOS

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def get_model_info(self) -> dict:
        return {"pretrained": self.name, "score_routing": self.routing}

    # -- scoring ------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (sum of the continuation's log-probs, greedy?)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Scoring requests")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            scores = self._score_rows([self._row(requests[i][1], requests[i][2]) for i in batch])
            for i, score in zip(batch, scores):
                out[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
            bar.update(len(batch))
        bar.close()
        return out

    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """(input ids, scored ids): the last max_length tokens of the row, and its last continuation tokens.
        The last token is an input too, as in training: with sequence routing it takes part in the routing."""
        row = (context + continuation)[-self.max_length:]
        return row, row[len(row) - min(len(continuation), len(row) - 1):]

    @torch.no_grad()
    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        width = max(len(inp) for inp, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([inp + [pad] * (width - len(inp)) for inp, _ in rows], device=self.device)
        mask = torch.tensor([[1] * len(inp) + [0] * (width - len(inp)) for inp, _ in rows], device=self.device)
        logits = self._forward(input_ids, mask, [len(inp) - len(tgt) for inp, tgt in rows])  # (B, W, V)
        out = []
        for b, (inp, tgt) in enumerate(rows):
            logp = F.log_softmax(logits[b, len(inp) - len(tgt) - 1 : len(inp) - 1].float(), dim=-1)  # (n, V)
            target = torch.tensor(tgt, device=logp.device)
            total = logp.gather(-1, target[:, None]).sum().item()
            out.append((total, bool((logp.argmax(-1) == target).all())))
        return out

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, context_lens: list[int]) -> torch.Tensor:
        """Logits (B, W, V); the memory's runtime state is empty before and after."""
        context = None
        if self.routing == "context":
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            context = (pos < torch.tensor(context_lens, device=pos.device)[:, None]).long()
        with self.model.scoring(context):
            return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of max_length tokens (each token once)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length - 1, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the task asks to sample; stops at any `until` string, EOS or `max_gen_toks`."""
        groups: dict[str, list[int]] = {}  # requests sharing their generation kwargs run in the same batches
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Generating")
        for idx in groups.values():
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], requests[batch[0]].args[1])
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until, max_new = kwargs.pop("until"), kwargs.pop("max_gen_toks")
        if not kwargs.get("do_sample"):
            kwargs.pop("temperature", None)
        keep = self.max_length - max_new
        if keep <= 0:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
        ids = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
        pad = self.tokenizer.pad_token_id
        input_ids, mask = left_pad(ids, pad, self.device)
        width = input_ids.shape[1]
        stops = StoppingCriteriaList([StopOnStrings(self.tokenizer, until, width)] if any(until) else [])
        tokens = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad,
                                     eos_token_id=self.tokenizer.eos_token_id, stopping_criteria=stops, **kwargs)
        return [cut_at_stops(self.tokenizer.decode(row[width:], skip_special_tokens=True), until) for row in tokens]


# ---------------------------------------------------------------------------------------------------------
# Running tasks


def task_manager(tasks: list[str], include_path: str | None = None):
    """A TaskManager that knows every name in `tasks` (else ConfigError). Indexing lm-eval's ~15k built-in
    task files takes seconds, so when the include path holds every requested task they are left out."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).exists():
            raise ConfigError("--lm-eval-include", f"not found: {include_path}")
        include_path = str(Path(include_path).resolve())  # lm-eval would read a relative path from the cwd
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError("--lm-eval-tasks", f"unknown task(s) {', '.join(unknown)}"
                          + ("" if include_path else "; tasks of a local folder need --lm-eval-include PATH"))
    return manager


def eval_cli(args) -> int:
    """`memory-transformer eval --checkpoint DIR --lm-eval-tasks T1,T2`: lm-eval's results table, or JSON."""
    tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
    manager = task_manager(tasks, args.lm_eval_include)
    model = load_model(args.checkpoint, overrides=args.set, allow_base_mismatch=args.allow_base_mismatch)
    lm = MemoryTransformerLM(model, batch_size=args.batch_size)
    lm.name = args.checkpoint
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                      batch_size=lm.batch_size)
    if args.json:
        print(json.dumps(results["results"], default=handle_non_serializable))
        return 0
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0


def main() -> None:
    """lm-eval's command line with this model registered: `python -m memory_transformer.lm_eval_adapter run
    --model memory-transformer --model_args pretrained=DIR --tasks ...`."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
