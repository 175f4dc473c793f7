"""A quantized bank read from a memory-mapped safetensors file: the same reads as the bank in memory, and resident
memory that grows with the chapters read, not with the bank."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank


@pytest.mark.parametrize("bits,kind", [(8, "standard"), (4, "standard"), (8, "factorized")])
def test_mapped_bank_reads_what_the_quantized_bank_reads(tmp_path, bits, kind):
    torch.manual_seed(0)
    extra = {"rank": 16} if kind == "factorized" else {}
    bank = MemoryBank(8 * 32, 8, 32, kind=kind, learned_kv=True, **extra)
    bank.quantize_(bits, group_size=16)
    save_file({f"banks.0.{k}": v.contiguous() for k, v in bank.state_dict().items()}, tmp_path / "bank.safetensors")
    mapped = MemoryBank.mapped(str(tmp_path / "bank.safetensors"), "banks.0.", 8 * 32, 8, 32, bits, 16,
                               kind=kind, learned_kv=True, **extra)
    torch.testing.assert_close(mapped.read([5, 2]), bank.read([5, 2]), atol=0, rtol=0)
    assert mapped.stored_footprint() == bank.stored_footprint()
    attn = MemoryAttention(AttentionArgs(32, 32, 4, 8, 1, wo_init="normal", learned_kv=True, slot_top_k=4)).eval()
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(h, mapped)[0], attn(h, bank)[0], atol=0, rtol=0)
        attn(h, mapped)  # K/V cached per chapter: a mapped chapter never changes
    assert len(attn._kv_cache) >= 1


RSS_SCRIPT = """
import sys, torch
from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.routing import Routing

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

path, chapters, reads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
attn = MemoryAttention(AttentionArgs(64, 64, 4, chapters, 1, wo_init="normal", learned_kv=True, slot_top_k=8))
attn.eval()
bank = MemoryBank.mapped(path, "", chapters * 512, chapters, 64, 8, learned_kv=True)
h = torch.randn(1, 1, 64)

def read(chapter):
    ids = torch.tensor([[chapter]])
    with torch.no_grad():
        attn(h, bank, lambda x, mask: Routing(ids, torch.ones(1, 1)))

read(chapters - 1)  # warm: kernels, allocator, the file's header
before = rss()
for c in range(reads):
    read(c * (chapters // reads))
print(rss() - before)
"""


def test_resident_memory_grows_with_the_chapters_read_not_the_bank(tmp_path):
    """A 68 MB int8 bank (1,024 chapters of 512 slots x [key | value] of 64, 66 KB each): reading 4 chapters adds
    at most 2 MB per chapter read (its bytes, their float copy, the cached K/V) to the resident memory, and
    under an eighth of the bank."""
    chapters = 1024
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(chapters):  # stored as a quantized bank saves them
        tensors[f"q.{i}"] = torch.randint(-127, 128, (512, 128), dtype=torch.int8, generator=g)
        tensors[f"scale.{i}"] = torch.full((512, 2), 0.01, dtype=torch.float16)
    save_file(tensors, tmp_path / "bank.safetensors")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(tmp_path / "bank.safetensors"),
                          str(chapters), "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    assert size > 64e6 and grown < min(4 * 2e6, size / 8), (grown, size)
