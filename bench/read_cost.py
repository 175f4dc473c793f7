"""Issue 18's table: what one memory read costs, per layer, against a SwiGLU MLP of the same width, in one run.

Every layer is called as the hooks call it (`MemoryAttention` + `MemoryBank`; PKM = lucidrains'
`product-key-memory`, only if installed): one layer, d=256, batch 8 x 256 tokens. A training step = forward +
backward of `out.square().mean()` (+ an AdamW step over the layer's parameters), divided by the same step of a
SwiGLU MLP (d -> 4d -> d) measured interleaved with it; the median of the per-repeat ratios. Decode = batch 1,
one token, no autograd, the layer's K/V cache warm: median microseconds per call, the layer routing at every call
and (decision kept) with the first call's decision kept, as a generation with sequence routing decodes.

    python bench/read_cost.py [--repeats 5] [--chapter-size 1024] [--hidden 256] [--batch 8] [--seq 256]
                              [--decode-calls 200] [--skip-million] [--rows a,b,...]
                              [--mapped-chapters 8192] [--mapped-dir DIR]

`--chapter-size 16 --hidden 32 --batch 2 --seq 8` runs in seconds (tests/test_bench_read_cost.py). The last layer
row reads a bank from a memory-mapped int8 safetensors file (8,192 chapters x 1,024 slots = 8M slots, 4 GiB on
disk by default), a chapter not read before at every call. The second table is the issue's goal table (today = the
issue's numbers): its training ratios are measured again with the two layers interleaved, step for step, since
rows measured minutes apart on a shared machine differ by more than the goals' margins.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.routing import FrozenPrompt

DEFAULT = {"learned_kv": True, "slot_top_k": 8, "wo_init": "identity"}  # the library's default read
DENSE = {"learned_kv": False, "slot_top_k": None, "wo_init": "normal"}  # W_k, W_v, every slot


@dataclass
class Row:
    key: str
    label: str  # {S} = the slot count, filled in from --chapter-size
    chapters: int
    read: dict
    routing: str = "sequence"
    pkm: bool = False


ROWS = [
    Row("small", "{S} slots, 1 chapter, default read (learned K/V, slot top-8)", 1, DEFAULT),
    Row("chapters", "{S} slots, 128 chapters, top-1, default read", 128, DEFAULT),
    Row("token", "{S} slots, 128 chapters, `routing: token`", 128, DEFAULT, "token"),
    Row("million", "{S} slots, 1,024 chapters, top-1, default read", 1024, DEFAULT),
    Row("dense", "{S} slots, projected K/V, dense read", 1, DENSE),
    Row("dense_chapters", "{S} slots / 128 chapters, projected K/V, dense read", 128, DENSE),
    Row("pkm", "product-key memory (lucidrains PKM), {S} values, top-32", 128, {}, pkm=True),
    Row("pkm_million", "product-key memory, {S} values", 1024, {}, pkm=True),
]
ROW = {r.key: r for r in ROWS}
PAIRS = [("token", "chapters"), ("small", "dense"), ("million", "small")]  # the goal table's training ratios
TODAY = {  # the measurements: train ÷ MLP, + AdamW ÷ MLP, decode µs
    "small": (3.49, 3.45, 539), "chapters": (3.53, 3.95, 552), "token": (384.6, 413, 575),
    "million": (5.53, 5.73, 571), "dense": (1.89, 1.95, 158), "dense_chapters": (3.49, 3.67, 193),
    "pkm": (5.85, 8.49, 579), "pkm_million": (19.1, 77.1, 1317),
}


class SwiGLU(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False), \
            nn.Linear(4 * d, d, bias=False)

    def forward(self, h):
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def make(row: Row, args) -> tuple[nn.Module, list[nn.Parameter]]:
    """The layer as a function h -> out, and the parameters its AdamW steps."""
    torch.manual_seed(0)
    slots = row.chapters * args.chapter_size
    if row.pkm:
        from product_key_memory import PKM
        layer = PKM(args.hidden, heads=4, num_keys=math.isqrt(slots), topk=min(32, math.isqrt(slots)),
                    dim_head=args.hidden // 4)
        return layer, list(layer.parameters())
    attn = MemoryAttention(AttentionArgs(args.hidden, args.hidden, 4, row.chapters, 1, routing=row.routing,
                                         **row.read))
    bank = MemoryBank(slots, row.chapters, args.hidden, learned_kv=row.read["learned_kv"])

    class Layer(nn.Module):  # the call the hooks make
        def __init__(self):
            super().__init__()
            self.attn, self.bank = attn, bank

        def forward(self, h, decide=None):
            return self.attn(h, self.bank, decide)[0]

    layer = Layer()
    return layer, list(layer.parameters())


def train_step(layer, opt, h) -> float:
    t0 = time.perf_counter()
    layer(h).square().mean().backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        for p in layer.parameters():
            p.grad = None
    return time.perf_counter() - t0


def decode_us(layer, h1: torch.Tensor, calls: int, kept: bool = False) -> float:
    """Median µs per call. `kept`: the decision of the first call kept for every call after it, as a generation
    with sequence routing decodes (routing.FrozenPrompt); otherwise the layer routes at every call."""
    layer.eval()
    args = (FrozenPrompt().bind(0, layer.attn.router, 0),) if kept else ()
    with torch.inference_mode():
        for _ in range(5):  # warm: K/V cache, allocator
            layer(h1, *args)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            layer(h1, *args)
            times.append(time.perf_counter() - t0)
    layer.train()
    return statistics.median(times) * 1e6


def available(row: Row) -> bool:
    if not row.pkm:
        return True
    try:
        import product_key_memory  # noqa: F401  (optional, bench only)
        return True
    except ImportError:
        return False


def measure(args) -> dict:
    """key -> (train ÷ MLP, + AdamW ÷ MLP, decode µs, decode µs with the decision kept or None) for every row
    that runs; "pairs" -> {(a, b): (a ÷ b training step, + AdamW)} measured interleaved."""
    rows = [r for r in ROWS if available(r) and r.key in args.rows]
    h = torch.randn(args.batch, args.seq, args.hidden, requires_grad=True)
    mlp = SwiGLU(args.hidden)
    mlp_opt = torch.optim.AdamW(mlp.parameters(), lr=1e-4, fused=True)  # as train/optim.py
    results = {}
    for row in rows:  # one row at a time (the 1M-slot rows hold GBs), each interleaved with the MLP
        layer, opt = trainable(row, args)
        train, adamw = interleaved((layer, opt), (mlp, mlp_opt), h, args.repeats)
        h1 = torch.randn(1, 1, args.hidden)
        dec = decode_us(layer, h1, args.decode_calls)
        kept = None if row.pkm else decode_us(layer, h1, args.decode_calls, kept=True)
        results[row.key] = (train, adamw, dec, kept)
        del layer, opt
    results["mlp"] = (1.0, 1.0, decode_us(mlp, torch.randn(1, 1, args.hidden), args.decode_calls), None)
    results["pairs"] = {}
    for a, b in PAIRS:  # the goal table's training ratios, the two layers interleaved (rows run minutes apart
        if a in args.rows and b in args.rows:  # on a shared machine differ by more than the goals' margins)
            results["pairs"][a, b] = interleaved(trainable(ROW[a], args), trainable(ROW[b], args), h, args.repeats)
    if args.mapped_chapters:
        results["mapped"] = measure_mapped(args)
    return results


def trainable(row: Row, args) -> tuple[nn.Module, torch.optim.Optimizer]:
    layer, params = make(row, args)
    return layer.train(), torch.optim.AdamW(params, lr=1e-4, fused=True)  # as train/optim.py


def interleaved(a: tuple, b: tuple, h: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Training steps of a and b = (layer, optimizer) in turn: the median over `repeats` of t(a) / t(b), without
    and with the AdamW step."""
    ratios = {False: [], True: []}
    for i in range(repeats + 2):
        for adamw in (False, True):
            t_b = train_step(b[0], b[1] if adamw else None, h)
            t_a = train_step(a[0], a[1] if adamw else None, h)
            if i >= 2:  # the first two warm up the allocator and AdamW's state
                ratios[adamw].append(t_a / t_b)
    return statistics.median(ratios[False]), statistics.median(ratios[True])


def write_int8_bank(path: str, chapters: int, slots: int, row: int) -> int:
    """A random int8 bank of [key | value] rows, as a quantized bank saves it (`q.<i>`, `scale.<i>`), written
    chapter by chapter in the safetensors layout (8-byte header size, JSON header, raw data) so that a bank larger
    than RAM never has to be held (safetensors' save_file takes every tensor in memory). Returns its bytes."""
    import json
    header, offset = {}, 0
    for i in range(chapters):
        for name, dtype, shape, size in ((f"q.{i}", "I8", [slots, row], slots * row),
                                         (f"scale.{i}", "F16", [slots, 2], slots * 2 * 2)):
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(0)
    scale = torch.full((slots, 2), 0.02, dtype=torch.float16).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _ in range(chapters):
            f.write(torch.randint(-127, 128, (slots, row), dtype=torch.int8, generator=g).numpy().tobytes())
            f.write(scale)
    return offset


def resident() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


def measure_mapped(args) -> tuple[int, float, int, int]:
    """A `MemoryBank.mapped` int8 bank of `--mapped-chapters` chapters: decode µs per call when every call reads
    a chapter not read before (file read + dequantize + K/V), and resident memory grown over those calls.
    -> (bank bytes, µs, chapters read, bytes grown)."""
    import os
    import tempfile
    from memory_transformer.memory.routing import Routing
    C, S, w = args.mapped_chapters, args.chapter_size, args.hidden
    with tempfile.TemporaryDirectory(dir=args.mapped_dir) as d:
        path = os.path.join(d, "bank.safetensors")
        size = write_int8_bank(path, C, S, 2 * w)
        attn = MemoryAttention(AttentionArgs(w, w, 4, C, 1, **DEFAULT)).eval()
        bank = MemoryBank.mapped(path, "", C * S, C, w, 8, learned_kv=True)
        h, times = torch.randn(1, 1, w), []
        calls = min(args.decode_calls, C - 1)
        with torch.inference_mode():
            attn(h, bank, lambda x, mask: Routing(torch.tensor([[C - 1]]), torch.ones(1, 1)))  # warm
            before = resident()
            for i in range(calls):
                ids = torch.tensor([[i * (C - 1) // calls]])
                t0 = time.perf_counter()
                attn(h, bank, lambda x, mask: Routing(ids, torch.ones(1, 1)))
                times.append(time.perf_counter() - t0)
            grown = resident() - before
    return size, statistics.median(times) * 1e6, calls, grown


def slots_label(row: Row, args) -> str:
    return row.label.format(S=f"{row.chapters * args.chapter_size:,}")


def table(results: dict, args) -> str:
    lines = [f"one layer, d={args.hidden}, batch {args.batch} x {args.seq}, chapter size {args.chapter_size}; "
             f"median of {args.repeats} repeats (ratios to the MLP measured interleaved); torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads",
             "| layer | train ÷ MLP (today) | train ÷ MLP | + AdamW ÷ MLP (today) | + AdamW ÷ MLP | decode µs (today) "
             "| decode µs | decode µs, decision kept |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        if row.key not in results:
            continue
        (t, a, d, kept), (t0, a0, d0) = results[row.key], TODAY[row.key]
        kept = "-" if kept is None else f"{kept:,.0f}"
        lines.append(f"| {slots_label(row, args)} | {t0:.2f}x | {t:.2f}x | {a0:.2f}x | {a:.2f}x | {d0:,} | {d:,.0f} "
                     f"| {kept} |")
    lines.append(f"| SwiGLU MLP d -> 4d -> d | 1x | 1x | 1x | 1x | | {results['mlp'][2]:,.0f} | |")
    if "mapped" in results:
        size, us, calls, grown = results["mapped"]
        lines.append(f"| {args.mapped_chapters * args.chapter_size:,} slots int8, memory-mapped "
                     f"({size / 2**20:,.0f} MiB), a new chapter every call | - | - | - | - | impossible | {us:,.0f} | |")
    return "\n".join(lines + ["", goal_table(results, args)])


def goal_table(r: dict, args) -> str:
    """The issue's goal rows: the training ratios of two rows measured interleaved (- where a row did not run)."""
    def ratio(a: str, b: str, col: int) -> str:
        return f"{r['pairs'][a, b][col]:.2f}" if (a, b) in r["pairs"] else "-"

    decode = f"{r['chapters'][2]:,.0f} µs ({r['chapters'][3]:,.0f} µs, decision kept)" if "chapters" in r else "-"
    rows = [
        ("token routing step ÷ sequence routing step, 128 chapters, top-1 (fwd + bwd; + AdamW)", "~109",
         f"{ratio('token', 'chapters', 0)}; {ratio('token', 'chapters', 1)}", "<= 1.3"),
        ("default read ÷ dense read of the same chapter, training step", "1.85", ratio("small", "dense", 0),
         "<= 1.1"),
        ("default read decode, per layer, 128 chapters", "552 µs", decode, "<= 150 µs"),
        ("1,024 chapters ÷ 1 chapter, training step with AdamW", "1.66", ratio("million", "small", 1), "<= 1.1"),
        ("generation tokens/s, memory ÷ base (bench/generation.py)", "0.44 (hidden 128)", "see generation.py",
         ">= 0.9"),
    ]
    if "mapped" in r:
        size, _, calls, grown = r["mapped"]
        rows.append((f"a bank read memory-mapped ({args.mapped_chapters * args.chapter_size:,} slots int8, "
                     f"{size / 2**20:,.0f} MiB): resident memory grown after reading {calls} chapters", "impossible",
                     f"{grown / 2**20:,.1f} MiB", "grows with the chapters read"))
    lines = ["| measure | today | now | goal |", "|---|---:|---:|---:|"]
    return "\n".join(lines + [f"| {m} | {t} | {n} | {g} |" for m, t, n, g in rows])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chapter-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--decode-calls", type=int, default=200)
    p.add_argument("--rows", default=",".join(r.key for r in ROWS), help="comma-separated row keys to run")
    p.add_argument("--skip-million", action="store_true", help="leave out the 1,024-chapter rows (GBs of RAM)")
    p.add_argument("--mapped-chapters", type=int, default=8192,
                   help="chapters of the memory-mapped int8 bank row (0: no such row); written to --mapped-dir")
    p.add_argument("--mapped-dir", default=None, help="where the mapped bank's file goes (default: the temp dir)")
    args = p.parse_args(argv)
    args.rows = [k for k in args.rows.split(",") if not (args.skip_million and "million" in k)]
    return args


def main(argv=None) -> str:
    args = parse(argv)
    text = table(measure(args), args)
    print(text)
    return text


if __name__ == "__main__":
    main()
