"""The exported student (training/export.py) without a training launch: a stage-0 checkpoint is
written by hand, exported, and loaded the ways users load it.

- The pooler: the initial student's own when its checkpoint has one, else the identity; never
  random, so ``AutoModel`` reports nothing missing.
- The directory is the encoder as ``AutoModel`` saves it, so ``AutoModel`` loads it with no load
  report at transformers' default verbosity (nothing missing, nothing unused) and the vectors of
  the checkpoint's masked-LM encoder; the MLM head is beside it (``mlm_head.safetensors``) and
  the project's loader (``load_masked_lm``, used by training and mmkd-init-student) restores it:
  the logits of the checkpoint's student. An architecture that does not split is saved whole.
- The tokenizer names a class that transformers 4.x also knows, and encodes as the original.
"""

from __future__ import annotations

import contextlib
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


def checkpoint_student(ckpt_dir: Path, tag: str, init: Path):
    """The masked-LM the checkpoint holds (what the export is made from), in eval mode."""
    from transformers import BertForMaskedLM

    module = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    model = BertForMaskedLM.from_pretrained(init)
    model.load_state_dict({k.removeprefix("student."): v for k, v in module.items() if k.startswith("student.")})
    return model.eval()


REPORT_WORDS = ("LOAD REPORT", "UNEXPECTED", "MISSING", "newly initialized", "not used", "not initialized")


@contextlib.contextmanager
def default_verbosity():
    """transformers' logging at its default level (warnings), whatever an earlier test set."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def assert_silent(text: str) -> None:
    assert not [w for w in REPORT_WORDS if w in text], text


@pytest.mark.parametrize("own_pooler", [True, False], ids=["own-pooler", "no-pooler"])
def test_export_loads_as_encoder_and_masked_lm(tmp_path, init_students, own_pooler):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    from mmkd_ds.mlm_head import HEAD_FILE, load_masked_lm

    init = init_students[own_pooler]
    tokenizer = AutoTokenizer.from_pretrained(init)
    student = BertForMaskedLM.from_pretrained(init)
    ckpt = fake_checkpoint(tmp_path / "ckpt", student)
    out = export_student(*ckpt, str(init), tokenizer, tmp_path / "student")
    trained = checkpoint_student(*ckpt, init)

    with default_verbosity():
        if not own_pooler:  # the capture works: the initial masked-LM has no pooler, and transformers says so
            assert "LOAD REPORT" in load_quietly(AutoModel, init)[2]
        encoder, info, report = load_quietly(AutoModel, out)
    # Nothing newly initialised (the pooler is in the export), nothing unused (the head is not).
    # (What a terminal shows, stdout and stderr of a fresh process: test_sentence_transformers_export.)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_silent(report)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and "mlm_head" in config["mmkd_mlm_head"]
    assert not any(k.startswith(("bert.", "cls.")) for k in load_file(str(out / "model.safetensors")))

    # The head file: the transform and the output bias, as the masked-LM keys them; the decoder
    # (the input embeddings) is not stored.
    head = load_file(str(out / HEAD_FILE))
    assert set(head) == {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
                         "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
                         "cls.predictions.transform.LayerNorm.bias"}, set(head)

    # The encoder's vectors are the checkpoint's masked-LM encoder's.
    enc = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(**enc).last_hidden_state, trained.bert(**enc).last_hidden_state)
        key = "encoder.layer.0.attention.self.query.weight"
        torch.testing.assert_close(encoder.state_dict()[key], student.state_dict()[f"bert.{key}"] + 0.01)

    # The project's masked-LM loader restores the trained head: the checkpoint's logits, quietly.
    with default_verbosity(), LoadReport() as report:
        mlm, mlm_info = load_masked_lm(out)
    assert not mlm_info["missing_keys"], mlm_info
    assert {k.removeprefix("bert.") for k in mlm_info["unexpected_keys"]} <= {"pooler.dense.weight", "pooler.dense.bias"}
    assert_silent(report.text())
    mlm.eval()
    with torch.no_grad():
        torch.testing.assert_close(mlm(**enc).logits, trained(**enc).logits)
    assert mlm.cls.predictions.decoder.weight.data_ptr() == mlm.bert.embeddings.word_embeddings.weight.data_ptr()
    # A plain AutoModelForMaskedLM does not know the file: its head is new, and transformers says so.
    _, plain_info, _ = load_quietly(AutoModelForMaskedLM, out)
    assert {k for k in plain_info["missing_keys"] if k.startswith("cls.predictions.transform")}, plain_info

    # The pooler is the initial student's own, or the identity.
    pooler = encoder.pooler.dense.weight
    if own_pooler:
        initial = load_file(str(init / "model.safetensors"))["bert.pooler.dense.weight"]
        torch.testing.assert_close(pooler, initial)
        assert "own pooler" in encoder.config.mmkd_pooler
    else:
        torch.testing.assert_close(pooler, torch.eye(pooler.shape[0]))
        assert encoder.pooler.dense.bias.abs().sum() == 0 and encoder.config.mmkd_pooler.startswith("identity")


ARCHITECTURES = {  # tiny configs; each builder gets the vocabulary size
    "distilbert": lambda v: __import__("transformers").DistilBertConfig(
        vocab_size=v, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=64),
    "roberta": lambda v: __import__("transformers").RobertaConfig(
        vocab_size=v, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=70),
    # ALBERT's pooler is a bare Linear (pooler.weight), which pooler_for_export does not supply:
    # its AutoModel cannot be filled exactly, so the export falls back to one masked-LM save.
    "albert": lambda v: __import__("transformers").AlbertConfig(
        vocab_size=v, hidden_size=16, embedding_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_other_architectures_split_by_their_own_names_or_are_saved_whole(tmp_path, student_tokenizer, arch, caplog):
    """The split uses the model's ``base_model_prefix`` and the names it finds (DistilBERT's
    ``vocab_*``, RoBERTa's ``lm_head.*``); an architecture that does not split (ALBERT) is
    written whole, as before, with a warning, and the loader finds no head file and loads it
    whole. Either way the masked-LM loads with the checkpoint's logits."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from mmkd_ds.mlm_head import HEAD_FILE, load_masked_lm

    torch.manual_seed(0)
    config = ARCHITECTURES[arch](len(student_tokenizer))
    AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path / "init")
    student_tokenizer.save_pretrained(tmp_path / "init")
    initial = AutoModelForMaskedLM.from_pretrained(tmp_path / "init")
    ckpt_dir, tag = fake_checkpoint(tmp_path / "ckpt", initial)
    with caplog.at_level(logging.WARNING, logger="mmkd_ds.training.export"):
        out = export_student(ckpt_dir, tag, str(tmp_path / "init"), AutoTokenizer.from_pretrained(tmp_path / "init"),
                             tmp_path / "student")
    module = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    trained = AutoModelForMaskedLM.from_config(config)
    trained.load_state_dict({k.removeprefix("student."): v for k, v in module.items() if k.startswith("student.")})
    ids = torch.tensor([[2, 40, 50, 60, 3]])
    architectures = json.loads((out / "config.json").read_text())["architectures"]
    fell_back = [r.getMessage() for r in caplog.records if "does not split" in r.getMessage()]
    if arch == "albert":
        assert fell_back and not (out / HEAD_FILE).exists() and architectures == ["AlbertForMaskedLM"]
    else:
        assert not fell_back and (out / HEAD_FILE).is_file() and architectures == [type(initial.base_model).__name__]
        with default_verbosity():
            encoder, info, report = load_quietly(AutoModel, out)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert_silent(report)
        with torch.no_grad():
            torch.testing.assert_close(encoder.eval()(input_ids=ids).last_hidden_state,
                                       trained.eval().base_model(input_ids=ids).last_hidden_state)
    mlm, mlm_info = load_masked_lm(out)
    assert not mlm_info["missing_keys"], mlm_info
    with torch.no_grad():
        torch.testing.assert_close(mlm.eval()(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)


def test_a_head_file_of_another_model_is_refused(tmp_path, init_students):
    from safetensors.torch import save_file
    from transformers import BertForMaskedLM

    from mmkd_ds.mlm_head import HEAD_FILE, restore_mlm_head

    save_file({"cls.predictions.bias": torch.zeros(3)}, str(tmp_path / HEAD_FILE), metadata={"masked_lm_class": "X"})
    with pytest.raises(ValueError, match="does not fit BertForMaskedLM"):
        restore_mlm_head(BertForMaskedLM.from_pretrained(init_students[False]), tmp_path / HEAD_FILE)


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
        student, _ = build_student(cfg)
    assert "pooler" not in report.text() and not caplog.records, report.text()
    # It trains on with the export's trained head (mlm_head.safetensors), not a new one.
    from safetensors.torch import load_file

    for key, value in load_file(str(out / "mlm_head.safetensors")).items():
        torch.testing.assert_close(student.state_dict()[key], value, msg=key)

    BertModel(BertForMaskedLM.from_pretrained(init).config).save_pretrained(tmp_path / "bare")
    student_tokenizer.save_pretrained(tmp_path / "bare")
    cfg.student.name = str(tmp_path / "bare")
    with caplog.at_level(logging.WARNING):
        build_student(cfg)
    assert [r.getMessage() for r in caplog.records if "cls.predictions.transform.dense.weight" in r.getMessage()]


def test_init_student_from_an_export_keeps_its_trained_head(tmp_path, init_students):
    """``mmkd-init-student --from EXPORT`` (e.g. to extend its vocabulary) starts from the export's
    trained MLM head, not a fresh one, and writes a masked-LM holding it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    from mmkd_ds.cli.init_student import from_pretrained

    init = init_students[False]
    out = export_student(*fake_checkpoint(tmp_path / "ckpt", BertForMaskedLM.from_pretrained(init)), str(init),
                         AutoTokenizer.from_pretrained(init), tmp_path / "student")
    summary = from_pretrained(str(out), [], 0, tmp_path / "again")
    assert summary["fresh_mlm_head"] is False, summary
    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "again").state_dict()
    for key, value in load_file(str(out / "mlm_head.safetensors")).items():
        torch.testing.assert_close(again[key], value, msg=key)
