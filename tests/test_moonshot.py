"""bench/moonshot_20b.py's writer on a tiny shape, as the script runs: a pre-quantized nf4 checkpoint written
layer by layer (peak memory about one layer, never the fp16 model), which neoxlite loads and decodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from neoxlite import GPTNeoXForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "moonshot_20b.py"


def test_the_moonshot_writer_holds_one_layer_at_a_time_and_neoxlite_loads_its_checkpoint(tmp_path):
    folder, figures = tmp_path / "tiny-nf4", tmp_path / "figures.json"
    subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--write-only", "--folder", str(folder),
                    "--out", str(figures)], check=True, capture_output=True, timeout=300)
    written = json.loads(figures.read_text())["writer"]
    growth = written["rss_peak"] - written["rss_start"]
    assert growth < 3 * written["layer_fp16_bytes"] < written["model_fp16_bytes"] / 2, written
    model = GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    assert model.quant_spec.mode == "nf4" and model.config.num_hidden_layers == 8
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, eos_token_id=[])
    assert tokens.shape == (1, 6)
