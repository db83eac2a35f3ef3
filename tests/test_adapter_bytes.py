"""LoRA-SP's adapter bytes against plain LoRA's, counted from the tensors a real ZeRO-3 run holds (memory/inventory.py)
and checked against hand arithmetic for the tiny preset, not against the module's own formulas."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two real DeepSpeed runs

# tiny: hidden 128, intermediate 256, 4 layers; r = 16 on the 7 projections. Entries of A (r x in) and B (out x r):
#   q, k, v, o: A 16·128 = 2048, B 128·16 = 2048;  gate, up: A 2048, B 256·16 = 4096;  down: A 16·256 = 4096, B 2048
A_ENTRIES = 4 * (4 * 2048 + 2 * 2048 + 4096)  # 65,536
B_ENTRIES = 4 * (4 * 2048 + 2 * 4096 + 2048)  # 73,728
ENTRIES = A_ENTRIES + B_ENTRIES  # 139,264
BF16, FP32_ADAM = 2, 12  # train.precision=bf16 values and gradients; fp32 master + Adam m and v


def expected(variant: str) -> dict[str, int]:
    trained = ENTRIES // 2 if variant == "lorasp" else ENTRIES
    return {
        "params": trained * BF16,
        # A's frozen half is stored; B's is all zeros (B starts at zero) and is not
        "frozen": A_ENTRIES // 2 * BF16 if variant == "lorasp" else 0,
        "masks": ENTRIES // 8 if variant == "lorasp" else 0,  # one bit per entry; every matrix is a multiple of 8
        "gradients": trained * BF16,
        "optimizer": trained * FP32_ADAM,
    }


@pytest.fixture(scope="module")
def counted(tmp_path_factory, seed_tiny) -> dict[str, dict[str, int]]:
    out = seed_tiny(tmp_path_factory.mktemp("adapter-bytes"))
    runs = {}
    for variant in ("lorasp", "lora"):  # side by side: each is one process on one core
        cmd = [sys.executable, "-m", "lorasp_dist", "train", str(REPO / "examples" / "tiny.yaml"),
               "train.max_steps=1", "data.seq_len=64", "train.eval_every=0", "train.save_every=0",
               f"lorasp.variant={variant}", f"train.output_dir={out}", f"train.run_name={variant}"]
        runs[variant] = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = {}
    for variant, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
        held[variant] = json.loads((out / variant / "memory" / "adapter_rank0.json").read_text())["bytes"]
    return held


@pytest.mark.parametrize("variant", ["lorasp", "lora"])
def test_counted_bytes_match_hand_arithmetic(counted, variant):
    held, want = counted[variant], expected(variant)
    for term in ("params", "frozen", "masks", "gradients"):
        assert held[term] == want[term], (variant, term, held[term], want[term])
    # DeepSpeed's Adam also keeps a step counter per parameter group (a 4-byte tensor)
    assert 0 <= held["optimizer"] - want["optimizer"] <= 64, (variant, held["optimizer"], want["optimizer"])


def test_lorasp_holds_at_most_055_of_lora(counted):
    ratio = sum(counted["lorasp"].values()) / sum(counted["lora"].values())
    assert ratio <= 0.55, ratio
    # and lora carries nothing beyond peft's dense A and B: no frozen values, no mask
    assert counted["lora"]["frozen"] == counted["lora"]["masks"] == 0
