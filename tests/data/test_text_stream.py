"""Streaming text data (data.text.streaming): the same samples as in memory, a seeded shuffle buffer, disjoint ranks,
exact continuation from a saved position, lazy errors, config errors, and `kdkit train` with exact resume.
Offline: a tokenizer trained here (tests/tiny_lm.py), local jsonl / text files / Hugging Face datasets."""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from kdkit.config.schema import DataConfig
from kdkit.data import build_text_data
from kdkit.data.text_sources import jsonl_records
from kdkit.data.text_stream import StreamingTextDataset, shuffle_buffer, stream_seed
from kdkit.data.text_tokens import TextEncoder, pack
from kdkit.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import write_yaml  # noqa: E402
from procs import kdkit_train  # noqa: E402
from tiny_lm import save_tiny_lm, tiny_tokenizer  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(path)
    return path


@pytest.fixture
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def instructions(n, offset=0):
    return [{"instruction": f"Name colour number {i}.", "context": "Pick one." if i % 2 else "",
             "response": f"Blue {i}." + (" Really blue." * 10 if i % 5 == 0 else "")} for i in range(offset, offset + n)]


def stream_cfg(path, source="jsonl", **kw):
    text = {"streaming": True, "max_length": 40, **kw.pop("text", {})}
    return DataConfig(source=source, path=str(path), text=text, **kw)


def rows(batch) -> list[tuple]:
    """(input ids, labels) of each row of a batch, padding dropped."""
    out = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = mask.bool()
        out.append((tuple(ids[keep].tolist()), tuple(labels[keep].tolist())))
    return out


def dataset_rows(ds) -> list[tuple]:
    return rows(ds.get_batch(torch.arange(len(ds)))) if ds is not None and len(ds) else []


def one_pass(train: StreamingTextDataset, epoch: int = 0) -> list:
    """Every sample of stream pass `epoch`, in order (records, or blocks when packed)."""
    out = []
    for e, _, sample in train.samples(epoch):
        if e != epoch:
            return out
        out.append(sample)


@pytest.mark.parametrize("template", [False, True])
def test_the_stream_holds_the_in_memory_samples(tmp_path, tok, template):
    """Held-out val/test plus one pass of the training stream are exactly the in-memory path's samples (the chat
    template, response-only labels and truncation of the same TextEncoder), in another order."""
    if template:
        tok.chat_template = CHATML
    path = write_jsonl(tmp_path / "d.jsonl", instructions(37))
    memory = build_text_data(DataConfig(source="jsonl", path=str(path), text={"max_length": 40}), tok, seed=0)
    data = build_text_data(stream_cfg(path, limit_eval=5, text={"shuffle_buffer": 8}), tok, seed=0)
    assert (len(data.val), len(data.test)) == (5, 5) and data.format == "instruction"
    assert data.tokenizer_fingerprint == memory.tokenizer_fingerprint
    streamed = dataset_rows(data.val) + dataset_rows(data.test) + rows(data.train.encode(one_pass(data.train)))
    expected = dataset_rows(memory.train) + dataset_rows(memory.val) + dataset_rows(memory.test)
    assert Counter(streamed) == Counter(expected) and len(streamed) == 37
    assert any(len(ids) == 40 for ids, _ in streamed)  # truncated ones among them
    records = list(jsonl_records(str(path), "instruction"))  # test: the stream's first limit_eval records, val the next
    assert dataset_rows(data.test) == rows(data.train.encode(records[:5]))
    assert dataset_rows(data.val) == rows(data.train.encode(records[5:10]))


def test_packed_text_files_stream_the_in_memory_blocks(tmp_path, tok):
    root = tmp_path / "docs"
    root.mkdir()
    docs = [f"def f{i}(x):\n    return x + {i}\n" * (1 + i % 4) for i in range(12)]
    for i, d in enumerate(docs):
        (root / f"{i:02d}.txt").write_text(d)
    (root / "empty.txt").write_text("  \n")
    data = build_text_data(stream_cfg(root, "text_files", limit_eval=2, val_fraction=0.0,
                                      text={"packing": True, "max_length": 16, "shuffle_buffer": 0}), tok, seed=0)
    enc = TextEncoder(tok, 16)
    records = [(str(root / f"{i:02d}.txt"), {"text": d}) for i, d in enumerate(docs)]
    blocks = pack(enc.encode("text", records[2:], truncate=False), 16)
    with pytest.warns(UserWarning, match="skipped 1 of 13"):
        streamed = one_pass(data.train)
    assert [b.tolist() for b in streamed] == [blocks.ids[a:b].tolist() for a, b in
                                              zip(blocks.offsets[:-1], blocks.offsets[1:])]
    batch = data.train.encode(streamed[:3])
    assert torch.equal(batch["labels"], batch["input_ids"])  # loss on every token of a block
    assert data.test.digest() == build_text_data(
        stream_cfg(root, "text_files", limit_eval=2, val_fraction=0.0, text={"packing": True, "max_length": 16}),
        tok, seed=0).test.digest()
    held = pack(enc.encode("text", records[:2], truncate=False), 16)
    assert torch.equal(data.test.stores[0].ids, held.ids)  # the held-out documents, packed as in memory


def test_shuffle_buffer_is_seeded_and_reshuffles_each_pass(tmp_path, tok):
    a, b = list(shuffle_buffer(range(100), 10, 7)), list(shuffle_buffer(range(100), 10, 7))
    assert a == b and sorted(a) == list(range(100)) and a != list(range(100))
    assert list(shuffle_buffer(range(100), 10, 8)) != a
    assert list(shuffle_buffer(range(5), 0, 1)) == list(range(5)) == list(shuffle_buffer(range(5), 1, 1))
    assert stream_seed(0, 0) != stream_seed(0, 1) != stream_seed(1, 1)

    path = write_jsonl(tmp_path / "d.jsonl", instructions(40))
    data = build_text_data(stream_cfg(path, limit_eval=4, text={"shuffle_buffer": 16}), tok, seed=3)
    order = [[where for where, _ in data.train.pass_records(e)] for e in (0, 1, 0)]
    assert order[0] == order[2] != order[1] and sorted(order[0]) == sorted(order[1])
    assert f"{path}:1" not in order[0] and len(order[0]) == 32  # the 8 held-out records never train
    other_seed = build_text_data(stream_cfg(path, limit_eval=4, text={"shuffle_buffer": 16}), tok, seed=4)
    assert [w for w, _ in other_seed.train.pass_records(0)] != order[0]
    limited = build_text_data(stream_cfg(path, limit_eval=4, limit_train=10, text={"shuffle_buffer": 0}), tok, seed=3)
    assert [w for w, _ in limited.train.pass_records(0)] == [f"{path}:{i}" for i in range(9, 19)]


def _steps(train, batch_size, world_size, accum, steps):
    """The samples of each optimizer step, over all ranks, as a set of (ids, labels) rows."""
    loaders = [train.batches(batch_size, rank=r, world_size=world_size) for r in range(world_size)]
    out, seen = [], []
    for _ in range(steps):
        step = []
        for loader in loaders:
            for _ in range(accum):
                step += rows(next(loader))
        out.append(Counter(step))
        seen.append([loader.position for loader in loaders])
    assert all(len({json.dumps(p) for p in ps}) == 1 for ps in seen)  # every rank at the same position
    return out


def test_ranks_take_disjoint_samples_and_steps_do_not_depend_on_the_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", instructions(64))  # distinct records: distinct samples
    data = build_text_data(stream_cfg(path, limit_eval=2, val_fraction=0.0, text={"shuffle_buffer": 20}), tok,
                           seed=0)
    ranks = [data.train.batches(4, rank=r, world_size=3) for r in range(3)]
    taken = [[row for _ in range(5) for row in rows(next(b))] for b in ranks]  # 5 x 4 x 3 = 60 of 62 samples
    everything = [row for row in rows(data.train.encode(one_pass(data.train)))]
    assert sum(len(t) for t in taken) == 60 and len(set().union(*map(set, taken))) == 60
    assert set().union(*map(set, taken)) <= set(everything)
    one = data.train.batches(12)
    single = [row for _ in range(5) for row in rows(next(one))]
    assert Counter(single) == Counter(row for t in taken for row in t)
    # the global batch of each step: 2 x 3 processes x 2 micro-batches = 4 x 1 x 3 = 12 x 1 x 1
    a = _steps(data.train, 2, 3, 2, 7)  # 7 steps of 12 > one pass of 62: crosses into the next pass
    assert a == _steps(data.train, 4, 1, 3, 7) == _steps(data.train, 12, 1, 1, 7)


def test_a_saved_position_continues_the_same_stream(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", instructions(30))
    data = build_text_data(stream_cfg(path, limit_eval=3, text={"shuffle_buffer": 10}), tok, seed=0)  # 24 to train
    # windows of 4 x 2 samples: mid-pass, exactly at the end of pass 0, and in pass 2
    for stop, at in ((2, {"epoch": 0, "offset": 16}), (3, {"epoch": 0, "offset": 24}), (7, {"epoch": 2, "offset": 8})):
        straight = data.train.batches(4, rank=1, world_size=2)
        for _ in range(stop):
            next(straight)
        position = dict(straight.position)
        assert position == at
        expected = [next(straight) for _ in range(8)]
        resumed = data.train.batches(4, rank=1, world_size=2, position=json.loads(json.dumps(position)))
        for want in expected:
            got = next(resumed)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert resumed.position == straight.position


def test_a_bad_line_fails_when_the_stream_reaches_it(tmp_path, tok):
    lines = [json.dumps(r) for r in instructions(30)]
    lines[24] = '{"instruction": "Name one.", "response": '  # line 25
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    data = build_text_data(stream_cfg(path, limit_eval=4, text={"shuffle_buffer": 0}), tok, seed=0)  # no error yet
    batches = data.train.batches(4)
    for _ in range(4):  # records 9..24: up to the line before the bad one
        next(batches)
    with pytest.raises(DataError, match=rf"{path}:25: not valid JSON"):
        next(batches)
    lines[24] = json.dumps({"instruction": "Name one.", "response": "  "})
    write_jsonl(path, lines)
    resumed = data.train.batches(4, position={"epoch": 0, "offset": 12})  # skips the bad line's predecessors
    next(resumed)
    with pytest.raises(DataError, match=rf"{path}:25: field 'response' is empty"):
        next(resumed)
    del lines[20:]
    lines[2] = json.dumps({"instruction": "x"})  # a bad held-out record fails at once
    write_jsonl(path, lines)
    with pytest.raises(DataError, match=rf"{path}:3: missing field 'response'"):
        build_text_data(stream_cfg(path, limit_eval=4), tok, seed=0)
    with pytest.raises(DataError, match="leaves none to train on"):
        build_text_data(stream_cfg(write_jsonl(path, instructions(8)), limit_eval=4), tok, seed=0)


def test_local_hf_datasets_stream_with_their_own_test_split(tmp_path, tok):
    import datasets

    def split(n, offset=0):
        recs = instructions(n, offset)
        return datasets.Dataset.from_dict({k: [r[k] for r in recs] for k in recs[0]})

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": split(20), "test": split(6, offset=20)}).save_to_disk(str(saved))
    files = tmp_path / "files"  # a local data directory, read by datasets.load_dataset(..., streaming=True)
    files.mkdir()
    write_jsonl(files / "train.jsonl", instructions(20))
    write_jsonl(files / "test.jsonl", instructions(6, offset=20))
    memory = build_text_data(DataConfig(source="hf", path=str(saved), val_fraction=0.0, text={"max_length": 40}),
                             tok, seed=0)
    for path in (saved, files):
        data = build_text_data(stream_cfg(path, "hf", limit_eval=3), tok, seed=0)
        assert dataset_rows(data.test) == dataset_rows(memory.test)[:3]  # the source's own test split, capped
        assert len(data.val) == 3  # carved: the stream's first 3 records
        streamed = dataset_rows(data.val) + rows(data.train.encode(one_pass(data.train)))
        assert Counter(streamed) == Counter(dataset_rows(memory.train))
    with pytest.raises(ConfigError, match="data.limit_eval"):  # a val split to carve needs limit_eval
        build_text_data(stream_cfg(saved, "hf"), tok, seed=0)
    whole = build_text_data(stream_cfg(saved, "hf", val_fraction=0.0), tok, seed=0)  # own test only: no limit needed
    assert whole.val is None and dataset_rows(whole.test) == dataset_rows(memory.test)
    bad = tmp_path / "bad"
    recs = instructions(12)
    recs[7]["response"] = ""
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({k: [r[k] for r in recs] for k in recs[0]})}) \
        .save_to_disk(str(bad))
    data = build_text_data(stream_cfg(bad, "hf", limit_eval=2, val_fraction=0.0, text={"shuffle_buffer": 0}), tok,
                           seed=0)
    with pytest.raises(DataError, match=r"hf split 'train' row 7: field 'response' is empty"):
        one_pass(data.train)


def test_fingerprint_follows_the_source_and_settings(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", instructions(20))
    fp = lambda **kw: build_text_data(stream_cfg(path, limit_eval=3, **kw), tok, seed=0).fingerprint  # noqa: E731
    first = fp()
    assert fp() == first
    assert fp(text={"shuffle_buffer": 5}) != first and fp(text={"max_length": 30}) != first
    memory = build_text_data(DataConfig(source="jsonl", path=str(path), limit_eval=3), tok, seed=0)
    assert memory.fingerprint != first
    with path.open("a") as f:  # appended records only the stream reads: the file's size tells
        f.write(json.dumps(instructions(1, offset=99)[0]) + "\n")
    assert fp() != first


def test_streaming_config_errors_name_the_dotted_path(tmp_path, tok):
    from kdkit.config import load_config

    path = write_jsonl(tmp_path / "d.jsonl", instructions(20))
    base = {"task": "lm", "data": {"source": "jsonl", "path": str(path), "text": {"streaming": True}},
            "student": {"hf_config": {"model_type": "qwen2"}}, "train": {"batch_size": 4}}
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path / "c.yaml", base))
    assert {p for p, _ in err.value.problems} == {"train.max_steps", "data.limit_eval"}
    base["data"]["text"]["mixture"] = [{"source": "jsonl", "path": str(path)}]
    base["train"] = {"max_steps": 5, "batch_size": "auto", "global_batch_size": 8}
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path / "c.yaml", base))
    assert {p for p, _ in err.value.problems} == {"train.batch_size", "data.text.mixture"}
    with pytest.raises(ConfigError, match="data.limit_eval"):
        build_text_data(stream_cfg(path), tok, seed=0)
    with pytest.raises(ConfigError, match="data.text.packing"):
        build_text_data(stream_cfg(path, limit_eval=2, text={"packing": True}), tok, seed=0)
    data = build_text_data(stream_cfg(path, limit_eval=2), tok, seed=0)
    with pytest.raises(Exception, match="no length"):
        len(data.train)


# ---- kdkit train ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory, tok_dir):
    tmp = tmp_path_factory.mktemp("stream-lm")
    save_tiny_lm(tmp / "teacher", tok_dir, hidden=16, layers=1)
    write_jsonl(tmp / "data.jsonl", instructions(44))  # 4 test + 4 val held out, 36 to train: 4.5 steps a pass
    return tmp


def stream_config(tmp, tok_dir, out):
    return {
        "task": "lm", "output_dir": str(out), "seed": 0,
        "data": {"source": "jsonl", "path": str(tmp / "data.jsonl"), "limit_eval": 4,
                 "text": {"max_length": 32, "streaming": True, "shuffle_buffer": 12}},
        "student": {"hf_config": {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "tie_word_embeddings": False, "attention_dropout": 0.1},
                    "tokenizer": str(tok_dir)},
        "teacher": {"pretrained": str(tmp / "teacher")},
        "distill": {"temperature": 2.0, "terms": [{"kind": "ce", "weight": 0.5}, {"kind": "kd", "weight": 0.5}]},
        "train": {"max_steps": 8, "batch_size": 4, "grad_accum": 2, "lr": 0.003, "eval_every": 4, "save_every": 2,
                  "keep_last": 10, "log_every": 1, "progress": False, "tracker": "none", "export": "last"},
        "eval": {"batch_size": 8, "generate_samples": 1, "max_new_tokens": 2, "efficiency": False},
    }


@pytest.fixture(scope="module")
def straight(lm_setup, tok_dir):
    import contextlib
    import io

    from kdkit.cli.main import main

    out = lm_setup / "straight"
    config = write_yaml(lm_setup / "straight.yaml", stream_config(lm_setup, tok_dir, out))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["train", str(config), "--no-report"]) == 0
    (out / "stdout.txt").write_text(log.getvalue())
    return out


def test_kdkit_train_streams_the_training_set(straight, lm_setup):
    assert f"data: streaming train from jsonl {lm_setup / 'data.jsonl'}, 4 val / 4 test samples (instruction)" in (
        straight / "stdout.txt").read_text()
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["student"]["perplexity"] > 1 and metrics["test_samples"] == 4
    history = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if r["kind"] == "train"] == list(range(1, 9))
    state = json.loads((straight / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert state["stream"] == {"epoch": 1, "offset": 28}  # 8 steps x 8 samples = 64 = 36 of pass 0 + 28 of pass 1


@pytest.mark.parametrize("stop_at", [2, 6])  # in pass 0, and in pass 1
def test_resume_from_a_checkpoint_is_bit_identical(straight, tmp_path, stop_at):
    from safetensors.torch import load_file

    from kdkit.config import load_config
    from kdkit.experiment import train_run
    from kdkit.train import checkpoint as ckpt

    victim = tmp_path / "victim"
    shutil.copytree(straight, victim)  # as if the run had stopped right after checkpoint `stop_at`
    for d in ckpt.step_checkpoints(victim / "checkpoints"):
        if int(d.name.split("-")[1]) > stop_at:
            shutil.rmtree(d)
    for name in ("student", "metrics.json", "checkpoints/best"):
        shutil.rmtree(victim / name) if (victim / name).is_dir() else (victim / name).unlink()
    config = load_config(victim / "config.yaml").model_copy(update={"output_dir": str(victim)})
    train_run(config, resume=True)
    a = load_file(str(straight / "student" / "model.safetensors"))
    b = load_file(str(victim / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k != "time_s"}  # noqa: E731
                         for line in (run / "history.jsonl").read_text().splitlines()]
    assert strip(straight) == strip(victim)


def test_two_processes_stream_like_one_with_the_same_global_batch(lm_setup, tok_dir, tmp_path):
    """Disjoint samples per rank and the same global batch: 4 x 2 micro-batches x 2 processes = 4 x 4 x 1."""
    from safetensors.torch import load_file

    from kdkit.config import validate
    from kdkit.experiment import train_run

    def config(name, accum):
        cfg = stream_config(lm_setup, tok_dir, tmp_path / name)
        cfg["student"]["hf_config"]["attention_dropout"] = 0.0  # dropout is per rank
        cfg["train"].update(grad_accum=accum, save_every=None, eval_every=8)
        return cfg

    train_run(validate(config("one", 4)))
    done = kdkit_train(write_yaml(tmp_path / "two.yaml", config("two", 2)), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / n / "history.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for n in ("one", "two")]
    assert len(losses[0]) == 8 and losses[0] == pytest.approx(losses[1], rel=1e-5)
