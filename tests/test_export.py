"""The exported student (training/export.py) without a training launch: a stage-0 checkpoint is
written by hand, exported, and loaded the ways users load it.

- The pooler: the initial student's own when its checkpoint has one, else the identity; never
  random, so ``AutoModel`` reports nothing missing.
- What transformers still reports: only keys that belong to the other loader's class (see
  ``expected_report``), never a missing (newly initialised) weight.
- The tokenizer names a class that transformers 4.x also knows, and encodes as the original.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from mmkd_ds.training.export import export_student, portable_tokenizer_config

TEXTS = ("Habari ya asubuhi, Élodie!", "Straße ÜBER café 東京")


def fake_checkpoint(root: Path, student) -> tuple[Path, str]:
    """A stage-0 checkpoint of the MMKD module: the student's weights, perturbed (so that the
    export is seen to hold trained weights), under ``student.``, plus a head's."""
    tag = "step00000002"
    (root / tag).mkdir(parents=True)
    module = {f"student.{k}": v + 0.01 if v.is_floating_point() else v for k, v in student.state_dict().items()}
    module["heads.proj.weight"] = torch.zeros(2, 2)
    torch.save({"module": module}, root / tag / "mp_rank_00_model_states.pt")
    return root, tag


def tiny_mlm(tokenizer, with_pooler_checkpoint: bool, out: Path) -> Path:
    """An initial student directory: a masked-LM checkpoint, or a pre-training one that also
    holds a pooler (as bert-base-multilingual-cased does)."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    if with_pooler_checkpoint:
        model = BertForPreTraining(config)
        model.config.architectures = ["BertForMaskedLM"]  # as on the hub
    else:
        model = BertForMaskedLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class LoadReport:
    """Everything transformers logs (any logger under ``transformers``) or warns while loading."""

    def __init__(self):
        self.records: list[str] = []

    def __enter__(self):
        self.handler = logging.Handler(level=logging.DEBUG)
        self.handler.emit = lambda record: self.records.append(record.getMessage())
        self.logger = logging.getLogger("transformers")
        self.logger.addHandler(self.handler)
        self.warnings = warnings.catch_warnings(record=True)
        self.caught = self.warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.warnings.__exit__(*exc)
        self.logger.removeHandler(self.handler)
        self.records += [str(w.message) for w in self.caught]

    def text(self) -> str:
        return "\n".join(self.records)


def load_quietly(cls, path: Path):
    with LoadReport() as report:
        model, info = cls.from_pretrained(path, output_loading_info=True)
    return model, info, report.text()


@pytest.fixture(scope="module")
def init_students(tmp_path_factory, student_tokenizer):
    root = tmp_path_factory.mktemp("export")
    return {own: tiny_mlm(student_tokenizer, own, root / f"init-{'pooler' if own else 'mlm'}") for own in (True, False)}


@pytest.mark.parametrize("own_pooler", [True, False], ids=["own-pooler", "no-pooler"])
def test_export_loads_as_encoder_and_masked_lm(tmp_path, init_students, own_pooler):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    init = init_students[own_pooler]
    tokenizer = AutoTokenizer.from_pretrained(init)
    student = BertForMaskedLM.from_pretrained(init)
    out = export_student(*fake_checkpoint(tmp_path / "ckpt", student), str(init), tokenizer, tmp_path / "student")

    if not own_pooler:  # the capture works: the initial masked-LM has no pooler, and transformers says so
        assert "pooler" in load_quietly(AutoModel, init)[2]
    encoder, info, report = load_quietly(AutoModel, out)
    # Nothing newly initialised: the pooler is in the export.
    assert not info["missing_keys"] and "pooler" not in report and "newly initialized" not in report, report
    # transformers 4.x stays silent here (the MLM head is "not used" at info level when the class
    # loaded is not config.architectures); 5.x lists the unused head as UNEXPECTED, whatever
    # the export does, since the masked-LM loader below needs it in the same file.
    assert {k.split(".")[0] for k in info["unexpected_keys"]} <= {"cls"}, info
    mlm, mlm_info, mlm_report = load_quietly(AutoModelForMaskedLM, out)
    assert not mlm_info["missing_keys"] and "MISSING" not in mlm_report and "newly initialized" not in mlm_report
    assert set(mlm_info["unexpected_keys"]) <= {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}, mlm_info

    # Trained weights in both views; the pooler is the initial student's own, or the identity.
    key = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(encoder.state_dict()[key], student.state_dict()[f"bert.{key}"] + 0.01)
    torch.testing.assert_close(mlm.state_dict()[f"bert.{key}"], encoder.state_dict()[key])
    pooler = encoder.pooler.dense.weight
    if own_pooler:
        from safetensors.torch import load_file

        initial = load_file(str(init / "model.safetensors"))["bert.pooler.dense.weight"]
        torch.testing.assert_close(pooler, initial)
        assert "own pooler" in encoder.config.mmkd_pooler
    else:
        torch.testing.assert_close(pooler, torch.eye(pooler.shape[0]))
        assert encoder.pooler.dense.bias.abs().sum() == 0 and encoder.config.mmkd_pooler.startswith("identity")
    enc = tokenizer(TEXTS[0], return_tensors="pt")
    assert mlm(**enc).logits.shape[-1] == len(tokenizer)


def test_tokenizer_config_names_a_class_both_versions_know(tmp_path, student_tokenizer):
    """A cased BERT WordPiece tokenizer becomes BertTokenizerFast with its normaliser's flags
    (without them BertTokenizerFast lower-cases), and encodes exactly as before."""
    from transformers import AutoTokenizer

    student_tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert portable_tokenizer_config(tmp_path / "tok", tokenizer) == "BertTokenizerFast"
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizerFast"
    assert config["do_lower_case"] is False and config["strip_accents"] is False
    assert "local_files_only" not in config  # how the test loaded it, not part of the tokenizer
    assert config["clean_up_tokenization_spaces"] is tokenizer.clean_up_tokenization_spaces
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(*TEXTS)["input_ids"] == tokenizer(*TEXTS)["input_ids"]
    assert "St" in again.convert_ids_to_tokens(again(TEXTS[1])["input_ids"])  # still cased
    # Without the normaliser's flags the same class lower-cases (what the flags are for).
    del config["do_lower_case"], config["strip_accents"]
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    flagless = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert "St" not in flagless.convert_ids_to_tokens(flagless(TEXTS[1])["input_ids"])


def test_other_fast_tokenizers_become_pretrained_tokenizer_fast(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(list(TEXTS) * 3, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<pad>"]))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>").save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert portable_tokenizer_config(tmp_path, tokenizer) in ("PreTrainedTokenizerFast", None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] != "TokenizersBackend"
    assert AutoTokenizer.from_pretrained(tmp_path)(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]


def test_training_loads_an_export_as_student_quietly(tmp_path, init_students, student_tokenizer, caplog):
    """A chained run (``student.name`` = an export, whose pooler the masked-LM does not use) logs
    nothing; a bare encoder as student, whose MLM head is newly initialised, is named in one warning."""
    from transformers import AutoTokenizer, BertForMaskedLM, BertModel

    from mmkd_ds.config.schema import RunConfig
    from mmkd_ds.training.loop import build_student

    init = init_students[False]
    out = export_student(*fake_checkpoint(tmp_path / "ckpt", BertForMaskedLM.from_pretrained(init)), str(init),
                         AutoTokenizer.from_pretrained(init), tmp_path / "student")
    cfg = RunConfig()
    cfg.student.name = str(out)
    with LoadReport() as report, caplog.at_level(logging.WARNING):
        build_student(cfg)
    assert "pooler" not in report.text() and not caplog.records, report.text()

    BertModel(BertForMaskedLM.from_pretrained(init).config).save_pretrained(tmp_path / "bare")
    student_tokenizer.save_pretrained(tmp_path / "bare")
    cfg.student.name = str(tmp_path / "bare")
    with caplog.at_level(logging.WARNING):
        build_student(cfg)
    assert [r.getMessage() for r in caplog.records if "cls.predictions.transform.dense.weight" in r.getMessage()]
