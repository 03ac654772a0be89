"""What README.md, docs/trainer.md and the demo config say about the demo is what the demo does.

Runs `make demo`'s configuration once as it ships (~45 s on 2 quiet cores) and compares the
documented numbers with the run's summary: the task accuracies (README) and the number of DPO
pairs whose rejected answer is the SFT model's own (docs/trainer.md). The numbers are those of
the 2-core development machine (`num_threads: 1`, the torch backend); a kernel change that moves
them must update the documentation in the same commit.
"""

import json
import re
from pathlib import Path

from fdiv_kernels.train.cli import main
from fdiv_kernels.train.config import load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_does_what_its_documentation_says(tmp_path, capsys):
    assert main(["pipeline", "--config", "demo", "--output", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    capsys.readouterr()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    trainer = (ROOT / "docs" / "trainer.md").read_text(encoding="utf-8")

    measured = re.search(r"measured: ([\d.]+)% -> ([\d.]+)% -> ([\d.]+)%", readme)
    acc = summary["task_accuracy"]
    assert [float(x) for x in measured.groups()] == [round(100 * acc[k], 1) for k in ("base", "sft", "dpo")], acc

    pairs = re.search(r"own wrong greedy answer \((\d+) of (\d+) pairs", trainer)
    n_pref = load_config("demo").data.synthetic.n_pref
    assert (int(pairs[1]), int(pairs[2])) == (summary["phases"]["dpo"]["rejected_self"], n_pref)

    # the config's own header claims the wall time README measured
    header = Path(resolve_config("demo")).read_text(encoding="utf-8").splitlines()[0]
    assert "under a minute on 2 quiet cores" in header and "under a minute on 2 quiet cores" in readme, header
