"""Write one-step ZeRO-2 and ZeRO-3 checkpoints of a tiny MMKD-shaped module, in one plain
process (a world of one, no launcher), for the export tests.

    python zero_checkpoints.py ROOT INITIAL_STUDENT_DIR

ROOT/zero{2,3}/checkpoints/step00000001 is a checkpoint as training writes it (DeepSpeed's
files, mmkd_state.json, `latest`), ROOT/zero{2,3}/truth.pt the student's weights after the step,
gathered from the partitions (what the export must hold).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class Wrapper(torch.nn.Module):
    """The student under ``student.`` and a head beside it, as in MMKDModel."""

    def __init__(self, init: str):
        super().__init__()
        from transformers import BertForMaskedLM

        self.student = BertForMaskedLM.from_pretrained(init)
        self.heads = torch.nn.Linear(4, 4)

    def forward(self, ids):
        return self.student(input_ids=ids).logits.float().pow(2).mean() + self.heads(torch.ones(1, 4)).sum()


def main(root: Path, init: str) -> None:
    import deepspeed

    from mmkd_ds.distributed import init_distributed
    from mmkd_ds.training.checkpoint import save_checkpoint

    init_distributed()
    for stage in (2, 3):
        torch.manual_seed(0)
        model = Wrapper(init)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        loss = engine(torch.tensor([[2, 5, 7, 9, 3]]))
        engine.backward(loss)
        engine.step()
        run = root / f"zero{stage}"
        client = {"step": 1, "schedule": {"steps": 4}, "stream": {"fingerprint": "corpus-fp"},
                  "settings": {"student.name": init, "student.revision": "main", "student.tokenizer": "",
                               "teacher.name": "tiny-teacher", "train.teacher_mode": "precomputed",
                               "precompute.out_dir": str(root / "shards"), "stream.shard_dir": "",
                               "data.sources": [{"path": "corpus/train.*.tsv", "format": "auto"}],
                               "data.heldout": [{"path": "corpus/heldout.*.tsv", "format": "auto"}]}}
        save_checkpoint(engine, run / "checkpoints", 1, client, rank=0)
        params = list(engine.module.student.parameters())
        with deepspeed.zero.GatheredParameters(params):
            torch.save({k: v.detach().clone().float() for k, v in engine.module.student.state_dict().items()},
                       run / "truth.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
