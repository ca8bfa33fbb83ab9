"""The export loads as ``sentence_transformers.SentenceTransformer(path)`` with mmkd-eval's
pooling: its ``encode`` gives the vectors retrieval scores, and retrieval computed from them
equals ``mmkd-eval --task retrieval``'s, number for number; ``AutoModel`` still loads it with
nothing missing. A stage-0 checkpoint written by hand (as in test_export.py), no launch."""

from __future__ import annotations

import json

import pytest
import torch

from test_export import LoadReport, fake_checkpoint, tiny_mlm

sentence_transformers = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, student_tokenizer):
    """One export per pooling, of the same checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from mmkd_ds.training.export import export_student
    from mmkd_ds.training.model_card import export_finisher

    root = tmp_path_factory.mktemp("st-export")
    init = tiny_mlm(student_tokenizer, False, root / "init")
    # 128 positions, as mmkd-eval's 128-token limit needs for the held-out sample's longest texts;
    # large random weights, so that sentences get clearly different vectors (with BERT's 0.02 every
    # [CLS] is nearly the same and nearest neighbours are decided by float rounding).
    config = json.loads((init / "config.json").read_text())
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(**{**config, "max_position_embeddings": 128, "initializer_range": 0.5})
                    ).save_pretrained(init)
    ckpt_dir, tag = fake_checkpoint(root / "ckpt", BertForMaskedLM.from_pretrained(init))
    tokenizer = AutoTokenizer.from_pretrained(init)
    return {pooling: export_student(ckpt_dir, tag, str(init), tokenizer, root / f"student-{pooling}",
                                    finish=export_finisher(ckpt_dir, tag, pooling))
            for pooling in ("cls", "mean")}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_transformer_encode_equals_retrieval_vectors(exports, pooling):
    from sentence_transformers import SentenceTransformer

    from mmkd_ds.evaluation.retrieval import embed_sentences, load_encoder
    from mmkd_ds.training.st_export import sentence_transformers_pooling

    out = exports[pooling]
    assert sentence_transformers_pooling(out) == pooling
    model = SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == 128  # mmkd-eval's limit
    texts = ["Habari ya asubuhi, Élodie!", "Straße ÜBER café", "Good morning to you all.", "a"]
    st = model.encode(texts, convert_to_tensor=True, batch_size=3).cpu()
    encoder, tokenizer = load_encoder(str(out))
    ours = embed_sentences(encoder, tokenizer, texts, pooling=pooling)
    torch.testing.assert_close(st, ours, rtol=1e-5, atol=1e-6)
    other = embed_sentences(encoder, tokenizer, texts, pooling="mean" if pooling == "cls" else "cls")
    assert not torch.allclose(st, other, atol=1e-3)  # the pooling is the one configured, not the other


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_retrieval_from_sentence_transformer_equals_mmkd_eval(exports, pooling, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from mmkd_ds.cli.evaluate import main
    from mmkd_ds.config.schema import DataConfig
    from mmkd_ds.data.corpus import build_heldout
    from mmkd_ds.evaluation.retrieval import retrieval_accuracy

    out = exports[pooling]
    assert main(["--task", "retrieval", "--model", str(out), "--pooling", pooling, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "retrieval.json").read_text())["per_language"]

    pairs = build_heldout(DataConfig()).pairs  # what mmkd-eval reads without --config
    model = SentenceTransformer(str(out), device="cpu")
    texts = sorted({t for p in pairs for t in (p.en, p.xx)})
    vectors = dict(zip(texts, model.encode(texts, convert_to_tensor=True).cpu()))
    for lang, scores in cli.items():
        en = torch.stack([vectors[p.en] for p in pairs if p.lang == lang])
        xx = torch.stack([vectors[p.xx] for p in pairs if p.lang == lang])
        assert scores["pairs"] == len(en)
        assert retrieval_accuracy(xx, en) == scores["xx2en"], lang
        assert retrieval_accuracy(en, xx) == scores["en2xx"], lang


def test_auto_model_still_loads_the_export(exports):
    """The sentence-transformers files change nothing for transformers: ``AutoModel`` finds the
    encoder with its pooler, nothing missing and nothing unused; the masked-LM loader of the
    project finds the head beside it."""
    from transformers import AutoModel

    from mmkd_ds.mlm_head import load_masked_lm

    out = exports["cls"]
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                 "config_sentence_transformers.json", "README.md", "mlm_head.safetensors"):
        assert (out / name).is_file(), name
    with LoadReport() as report:
        encoder, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert "LOAD REPORT" not in report.text() and "newly initialized" not in report.text(), report.text()
    _, mlm_info = load_masked_lm(out)
    assert not mlm_info["missing_keys"], mlm_info
    card = (out / "README.md").read_text()
    assert "mlm_head.safetensors" in card and "or AutoModelForMaskedLM" not in card
    config = json.loads((out / "sentence_bert_config.json").read_text())
    assert config == {"max_seq_length": 128, "do_lower_case": False}


LOADS = """
import sys
from transformers import AutoModel
from sentence_transformers import SentenceTransformer
from mmkd_ds.mlm_head import load_masked_lm

out, init = sys.argv[1:]
for name, load in (("AutoModel", lambda: AutoModel.from_pretrained(out)),
                   ("SentenceTransformer", lambda: SentenceTransformer(out, device="cpu")),
                   ("load_masked_lm", lambda: load_masked_lm(out)),
                   ("control", lambda: AutoModel.from_pretrained(init))):
    print(f"=== {name}", flush=True)
    print(f"=== {name}", file=sys.stderr, flush=True)
    load()
"""


def test_loads_print_no_load_report(exports):
    """What a user's terminal shows: a fresh process (transformers' logging as it starts, at its
    default level) loads the export with AutoModel, SentenceTransformer and the project's
    masked-LM loader; neither stdout nor stderr holds a load report. The control, the initial
    masked-LM loaded with AutoModel, shows that such a report would be seen."""
    import os
    import subprocess
    import sys

    out = exports["cls"]
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY",)}
    done = subprocess.run([sys.executable, "-c", LOADS, str(out), str(out.parent / "init")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    def sections(text: str) -> dict[str, str]:
        parts = text.split("=== ")[1:]
        return {p.split("\n", 1)[0]: p.split("\n", 1)[1] if "\n" in p else "" for p in parts}

    stdout, stderr = sections(done.stdout), sections(done.stderr)
    words = ("LOAD REPORT", "UNEXPECTED", "MISSING", "newly initialized", "not used", "not initialized")
    for name in ("AutoModel", "SentenceTransformer", "load_masked_lm"):
        text = stdout[name] + stderr[name]
        assert not [w for w in words if w in text], f"{name}: {text}"
    assert "LOAD REPORT" in stdout["control"] + stderr["control"]
