"""Training progress for people: plain lines off a terminal, every train.log_every steps and at the last one."""

from __future__ import annotations

import re

import torch

from lorasp_dist.engine.progress import TrainingProgress

LINE = re.compile(r"^\[lorasp\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (\d+)/5  loss 2\.5000  lr 1\.00e-03  1234 tok/s  "
                  r"eta \d+:\d\d:\d\d  host_rss \d+\.\d GiB$")


def test_lines_every_log_every_steps_and_at_the_end(capsys):
    metrics = {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.0}
    with TrainingProgress(total=5, start=1, every=2, device=torch.device("cpu"), enabled=True) as progress:
        for step in range(2, 6):  # resumed after step 1
            progress.update(step, metrics)
    lines = capsys.readouterr().out.splitlines()
    assert [int(LINE.match(line)[1]) for line in lines] == [2, 4, 5]
    with TrainingProgress(total=5, start=0, every=1, device=torch.device("cpu"), enabled=False) as progress:
        progress.update(1, metrics)  # ranks other than 0
    assert capsys.readouterr().out == ""
