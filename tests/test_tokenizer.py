"""`load_tokenizer` takes a shortcut for plain fast tokenizers: it must give what `AutoTokenizer` gives."""

import json
import shutil

import transformers

from lolcats_jax.tokenizer import load_tokenizer

TEXTS = ["Hello world", " leading space", "Once upon a time,\n\nthere was\ttab", "ünïcødé 日本語 🐈", "",
         "<|im_start|>user\nhi<|im_end|>"]


def _same(a, b) -> None:
    assert type(a) is type(b)
    for t in TEXTS:
        assert a(t)["input_ids"] == b(t)["input_ids"], t
        assert a(t, add_special_tokens=False)["input_ids"] == b(t, add_special_tokens=False)["input_ids"], t
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (b.bos_token_id, b.eos_token_id, b.pad_token_id)
    assert a.all_special_ids == b.all_special_ids and a.chat_template == b.chat_template
    turn = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) == \
        b.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def test_plain_fast_tokenizer_equals_auto_tokenizer(smollm2_dir):
    assert json.loads((smollm2_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    _same(load_tokenizer(smollm2_dir), transformers.AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True))


def test_other_tokenizer_classes_go_through_auto_tokenizer(smollm2_dir, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_dir / f).exists():
            shutil.copy(smollm2_dir / f, d / f)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    _same(load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True))


def test_long_documents_encode_without_the_length_warning(smollm2_dir, caplog):
    import logging

    from lolcats_jax.eval.encoding import encode

    tok = load_tokenizer(smollm2_dir)
    text = "word " * (tok.model_max_length + 100)
    with caplog.at_level(logging.WARNING):
        tok(text)  # the plain call warns: the check below can see it
    assert any("longer than the specified maximum" in r.getMessage() for r in caplog.records)
    caplog.clear()
    tok = load_tokenizer(smollm2_dir)  # transformers warns once per tokenizer object
    with caplog.at_level(logging.WARNING):
        assert len(encode(tok, text)) > tok.model_max_length
    assert not any("longer than the specified maximum" in r.getMessage() for r in caplog.records)
