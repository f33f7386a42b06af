"""Text data for task: lm: records -> tokens with prompt masking, truncation, packing, splits, mixtures and
fingerprints. Offline: a byte-level BPE tokenizer trained here (tests/tiny_lm.py)."""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kdkit.config.schema import DataConfig
from kdkit.data import build_text_data, make_loader
from kdkit.data.text import TextEncoder, tokenizer_fingerprint
from kdkit.data.text_sources import TextFilesWarning
from kdkit.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_lm import tiny_tokenizer  # noqa: E402

EOS = "<|endoftext|>"
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

    return AutoTokenizer.from_pretrained(tok_dir)  # a fresh copy: tests may set a chat template on it


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def instructions(n, long=False):
    return [{"instruction": f"Name colour number {i}.", "context": "Pick one." if i % 2 else "",
             "response": f"Blue {i}." + (" Really blue." * 40 if long else "")} for i in range(n)]


def cfg(path, source="jsonl", **kw):
    text = kw.pop("text", {})
    return DataConfig(source=source, path=str(path), text=text, **kw)


def loss_text(tok, sample) -> str:
    labels = sample["labels"]
    return tok.decode(labels[labels != -100].tolist())


def masks(labels: torch.Tensor) -> list[bool]:
    return (labels != -100).tolist()


# ---- layouts and masking ---------------------------------------------------------------------------------------


def test_instruction_masks_exactly_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "file.jsonl", instructions(20))
    data = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0)
    assert data.format == "instruction" and data.train.format == "instruction" and data.train.generative
    for ds in (data.train, data.test):
        for i in range(len(ds)):
            sample = ds[i]
            assert all(v.dtype == torch.int64 and v.ndim == 1 for v in sample.values())
            prompt, reference = ds.prompt(i)
            assert loss_text(tok, sample) == reference + EOS
            n = len(prompt)  # the prompt tokens start the sample and are exactly the masked ones
            assert torch.equal(sample["input_ids"][:n], prompt) and masks(sample["labels"]) == [False] * n + [True] * (
                len(sample["labels"]) - n)
            assert torch.equal(sample["labels"][n:], sample["input_ids"][n:])  # not shifted
            text = tok.decode(prompt.tolist())
            number = reference.split()[1].rstrip(".")
            expected = f"### Instruction:\nName colour number {number}.\n\n"
            expected += "### Input:\nPick one.\n\n" if int(number) % 2 else ""
            assert text == expected + "### Response:\n"
    assert len(data.train) + len(data.test) == 20 and len(data.test) == 4 and data.val is None


def test_chat_two_assistant_turns_plain_layout(tmp_path, tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Thanks"}]}
    path = write_jsonl(tmp_path / "file.jsonl", [conv] * 6)
    data = build_text_data(cfg(path, val_fraction=0.0, text={"format": "chat"}), tok, seed=0)
    sample = data.train[0]
    assert loss_text(tok, sample) == f"Hello.{EOS}Blue.{EOS}"
    whole = tok.decode(sample["input_ids"].tolist())
    assert whole == (f"### System:\nBe brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello.{EOS}"
                     f"### Instruction:\nName a colour.\n\n### Response:\nBlue.{EOS}")  # the last user turn: dropped
    prompt, reference = data.train.prompt(0)
    assert reference == "Blue." and tok.decode(prompt.tolist()) == whole[:whole.rindex("Blue.")]


def test_chat_template_masks_user_and_system_turns(tmp_path, tok):
    tok.chat_template = CHATML
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Blue."}]}
    path = write_jsonl(tmp_path / "file.jsonl", [conv] * 6)
    data = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0)
    assert data.format == "chat"
    sample = data.train[0]
    assert tok.decode(sample["input_ids"].tolist()) == tok.apply_chat_template(conv["messages"], tokenize=False)
    assert loss_text(tok, sample) == f"Hello.{EOS}\nBlue.{EOS}\n"  # each answer with the template's end of turn
    prompt, reference = data.train.prompt(0)
    expected = tok.apply_chat_template(conv["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert reference == "Blue." and tok.decode(prompt.tolist()) == expected
    # with chat_template off the same tokenizer gets the plain layout
    plain = build_text_data(cfg(path, val_fraction=0.0, text={"chat_template": False}), tok, seed=0)
    assert loss_text(tok, plain.train[0]) == f"Hello.{EOS}Blue.{EOS}"


def test_instruction_with_chat_template(tmp_path, tok):
    tok.chat_template = CHATML
    path = write_jsonl(tmp_path / "file.jsonl", instructions(10))
    data = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0)
    prompt, reference = data.train.prompt(0)
    assert tok.decode(prompt.tolist()) == f"<|im_start|>user\nName colour number 0.{EOS}\n<|im_start|>assistant\n"
    assert loss_text(tok, data.train[0]) == f"{reference}{EOS}\n"
    odd = next(i for i in range(len(data.train)) if int(data.train.prompt(i)[1].split()[1].rstrip(".")) % 2)
    assert "\n\nPick one.<|endoftext|>" in tok.decode(data.train.prompt(odd)[0].tolist())  # context joins the user turn


def test_plain_text_loss_on_every_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "file.jsonl", [{"text": f"The quick brown fox {i}."} for i in range(10)])
    data = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0)
    sample = data.train[0]
    assert data.format == "text" and not data.train.generative
    assert torch.equal(sample["labels"], sample["input_ids"]) and tok.decode(sample["input_ids"].tolist()).endswith(EOS)
    prompt, reference = data.train.prompt(0)  # no answer to compare with: the first half, to continue
    assert reference is None and torch.equal(prompt, sample["input_ids"][:len(sample["input_ids"]) // 2])


def test_a_bos_adding_tokenizer_opens_plain_samples_with_bos(tmp_path, tok):
    from tokenizers import processors

    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                                  special_tokens=[(tok.bos_token, bos)])
    assert tok("a")["input_ids"][0] == bos  # as a Llama tokenizer does
    path = write_jsonl(tmp_path / "file.jsonl", instructions(5))
    sample = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0).train[0]
    assert sample["input_ids"][0] == bos and sample["input_ids"][1] != bos and sample["labels"][0] == -100
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}] * 5)
    assert build_text_data(cfg(texts, val_fraction=0.0), tok, seed=0).train[0]["input_ids"][0] == bos
    tok.chat_template = CHATML  # a template writes its own BOS (or none): nothing is added
    sample = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0).train[0]
    assert tok.decode(sample["input_ids"].tolist()).startswith("<|im_start|>user")


# ---- truncation ------------------------------------------------------------------------------------------------


def test_truncation_keeps_the_prompt_and_the_response_start(tmp_path, tok):
    path = write_jsonl(tmp_path / "file.jsonl", instructions(10, long=True))
    data = build_text_data(cfg(path, val_fraction=0.0, text={"max_length": 48}), tok, seed=0)
    for i in range(len(data.train)):
        sample, (prompt, reference) = data.train[i], data.train.prompt(i)
        assert len(sample["input_ids"]) == 48
        assert torch.equal(sample["input_ids"][:len(prompt)], prompt)  # the whole prompt
        assert reference.startswith(loss_text(tok, sample))  # the response's start, no EOS
        assert masks(sample["labels"]).count(True) == 48 - len(prompt)


def test_a_prompt_longer_than_max_length_loses_its_start(tmp_path, tok):
    long = "word " * 80 + "LAST"
    path = write_jsonl(tmp_path / "file.jsonl", [{"instruction": long, "response": "Blue."}] * 5)
    data = build_text_data(cfg(path, val_fraction=0.0, text={"max_length": 32}), tok, seed=0)
    sample, (prompt, _) = data.train[0], data.train.prompt(0)
    assert len(sample["input_ids"]) == 32 and masks(sample["labels"]) == [False] * 31 + [True]
    assert tok.decode(sample["input_ids"][:31].tolist()).endswith("LAST\n\n### Response:\n")  # the prompt's end
    assert len(prompt) == 31 and torch.equal(prompt, sample["input_ids"][:31])
    assert loss_text(tok, sample) == tok.decode(tok("Blue.")["input_ids"][:1])


# ---- batches ---------------------------------------------------------------------------------------------------


def test_get_batch_pads_right_with_the_pad_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "file.jsonl", [{"text": "a" * (i + 1) + " b c d" * i} for i in range(12)])
    data = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0)
    index = torch.tensor([0, 3, 1])
    batch = data.train.get_batch(index)
    samples = [data.train[i] for i in index.tolist()]
    width = max(len(s["input_ids"]) for s in samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (3, width) and v.dtype == torch.int64 for v in batch.values())
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][r, :n], s["input_ids"])
        assert torch.equal(batch["labels"][r, :n], s["labels"])
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][r, n:] == tok.pad_token_id).all() and (batch["labels"][r, n:] == -100).all()
    loader = make_loader(data.train, batch_size=4, shuffle=True, seed=0)
    got = list(loader)
    assert sum(len(b["index"]) for b in got) == len(data.train)
    assert torch.equal(got[0]["input_ids"], data.train.get_batch(got[0]["index"])["input_ids"])


def test_pad_falls_back_to_eos(tmp_path, tok):
    tok.pad_token = None
    path = write_jsonl(tmp_path / "file.jsonl", [{"text": "a" * (i + 1)} for i in range(6)])
    data = build_text_data(cfg(path, val_fraction=0.0), tok, seed=0)
    batch = data.train.get_batch(torch.arange(len(data.train)))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all()


# ---- formats and bad records -----------------------------------------------------------------------------------


@pytest.mark.parametrize("record,fmt", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
    ({"instruction": "a", "response": "b", "text": "ignored"}, "instruction"),
    ({"text": "hello world"}, "text"),
])
def test_auto_format_from_the_first_record(tmp_path, tok, record, fmt):
    path = write_jsonl(tmp_path / "file.jsonl", [record] * 5)
    assert build_text_data(cfg(path, val_fraction=0.0), tok, seed=0).format == fmt


GOOD = {"instruction": "Name a colour.", "response": "Blue."}


@pytest.mark.parametrize("bad,fmt,message", [
    ('{"instruction": "a", "response": "b",}', "auto", r"file\.jsonl:3: not valid JSON"),
    ({"instruction": "Name a colour."}, "instruction", r"file\.jsonl:3: missing field 'response'"),
    ({"instruction": "Name a colour.", "response": "  "}, "auto", r"file\.jsonl:3: field 'response' is empty"),
    ({"instruction": "Name a colour.", "response": 3}, "auto", r"file\.jsonl:3: field 'response' must be a string"),
    ({"text": ""}, "text", r"file\.jsonl:3: field 'text' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat", r"file\.jsonl:3: the conversation has no assistant"),
    ({"messages": [{"role": "user"}]}, "chat", r"file\.jsonl:3: message 0: missing field 'content'"),
    ({"messages": "hi"}, "chat", r"file\.jsonl:3: field 'messages' must be a non-empty array"),
], ids=["bad-json", "missing-field", "empty-response", "non-string", "empty-text", "no-assistant", "no-content",
        "not-a-list"])
def test_each_bad_record_names_file_and_line(tmp_path, tok, bad, fmt, message):
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    first = {"text": "fine"} if fmt == "text" else chat if fmt == "chat" else GOOD
    path = write_jsonl(tmp_path / "file.jsonl", [first, first, bad, first])
    with pytest.raises(DataError, match=message):
        build_text_data(cfg(path, text={"format": fmt}), tok, seed=0)


def test_unknown_fields_cannot_be_auto_detected(tmp_path, tok):
    path = write_jsonl(tmp_path / "file.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(DataError, match=r"file\.jsonl:1: cannot tell the format"):
        build_text_data(cfg(path), tok, seed=0)


def test_packing_is_for_plain_text(tmp_path, tok):
    path = write_jsonl(tmp_path / "file.jsonl", instructions(5))
    with pytest.raises(ConfigError, match="data.text.packing"):
        build_text_data(cfg(path, text={"packing": True}), tok, seed=0)


# ---- text files, packing ---------------------------------------------------------------------------------------


def make_files(root: Path, n: int = 10) -> Path:
    for i in range(n):
        sub = root / ("src" if i % 2 else "docs")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:02d}.txt").write_text(f"MARK{i:02d}X " + "the quick brown fox jumps over the lazy dog. " * (3 + i))
    (root / "docs" / "empty.txt").write_text("  \n")
    (root / "docs" / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "docs" / "skip.md").write_text("not matched by the glob")
    return root


def markers(tok, ds) -> set:
    joined = tok.decode(torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist())
    return {joined[k + 4:k + 6] for k in range(len(joined)) if joined.startswith("MARK", k)}


def test_text_files_packed_into_full_blocks_and_split_by_file(tmp_path, tok):
    root = make_files(tmp_path / "corpus")
    config = cfg(root, source="text_files", val_fraction=0.25, text={"packing": True, "max_length": 16})
    with pytest.warns(TextFilesWarning, match=r"skipped 1 not valid UTF-8 .*binary\.txt.* and 1 empty of 12 file"):
        data = build_text_data(config, tok, seed=0)
    assert data.format == "text"
    for ds in (data.train, data.val, data.test):
        lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
        assert all(n == 16 for n in lengths[:-1]) and lengths[-1] >= 4  # a short last block is dropped
        assert all(torch.equal(ds[i]["labels"], ds[i]["input_ids"]) for i in range(len(ds)))
        assert ds.prompt(0)[1] is None and torch.equal(ds.prompt(0)[0], ds[0]["input_ids"][:8])
    train, val, test = markers(tok, data.train), markers(tok, data.val), markers(tok, data.test)
    assert (len(test), len(val)) == (2, 2)  # round(10 * 0.2) test files, round(8 * 0.25) validation files
    assert not (train & val or train & test or val & test) and train | val | test == {f"{i:02d}" for i in range(10)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = build_text_data(config, tok, seed=0)
        other = build_text_data(config, tok, seed=1)
    assert again.fingerprint == data.fingerprint and markers(tok, again.test) == test
    assert other.fingerprint != data.fingerprint


def test_text_files_without_packing_one_sample_per_file(tmp_path, tok):
    root = make_files(tmp_path / "corpus")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_text_data(cfg(root, source="text_files", val_fraction=0.0, text={"max_length": 24}), tok, seed=0)
    assert len(data.train) + len(data.test) == 10
    assert all(len(data.train[i]["input_ids"]) <= 24 for i in range(len(data.train)))
    assert tok.decode(data.train[0]["input_ids"].tolist()).startswith("MARK")  # truncation keeps a text's start


def test_text_files_errors(tmp_path, tok):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="none of the 1 file"), pytest.warns(TextFilesWarning):
        build_text_data(cfg(tmp_path / "bin", source="text_files"), tok, seed=0)
    with pytest.raises(DataError, match=r"no file matches '\*\*/\*\.py'"):
        build_text_data(cfg(tmp_path / "bin", source="text_files", text={"glob": "**/*.py"}), tok, seed=0)
    with pytest.raises(ConfigError, match="data.text.format"):
        build_text_data(cfg(tmp_path / "bin", source="text_files", text={"format": "chat"}), tok, seed=0)


# ---- splits ----------------------------------------------------------------------------------------------------


def test_splits_are_seeded_and_limited(tmp_path, tok):
    path = write_jsonl(tmp_path / "file.jsonl", instructions(50))
    data = build_text_data(cfg(path, val_fraction=0.1), tok, seed=0)
    refs = {name: [ds.prompt(i)[1] for i in range(len(ds))] for name, ds in
            (("train", data.train), ("val", data.val), ("test", data.test))}
    assert [len(v) for v in refs.values()] == [36, 4, 10]
    assert len(set(sum(refs.values(), []))) == 50
    limited = build_text_data(cfg(path, val_fraction=0.1, limit_train=7, limit_eval=3), tok, seed=0)
    assert (len(limited.train), len(limited.val), len(limited.test)) == (7, 3, 3)
    assert {limited.train.prompt(i)[1] for i in range(7)} <= set(refs["train"])
    assert {limited.test.prompt(i)[1] for i in range(3)} <= set(refs["test"])
    other = build_text_data(cfg(path, val_fraction=0.1), tok, seed=1)
    assert {other.test.prompt(i)[1] for i in range(10)} != set(refs["test"])


# ---- Hugging Face ----------------------------------------------------------------------------------------------


def test_local_hf_dataset_in_instruction_form(tmp_path, tok):
    datasets = pytest.importorskip("datasets")

    def split(n, offset=0):
        rows = instructions(n + offset)[offset:]
        return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("instruction", "context", "response")})

    path = tmp_path / "hf"
    datasets.DatasetDict({"train": split(20), "test": split(5, offset=20)}).save_to_disk(str(path))
    data = build_text_data(cfg(path, source="hf", val_fraction=0.25), tok, seed=0)
    assert data.format == "instruction" and (len(data.train), len(data.val), len(data.test)) == (15, 5, 5)
    assert sorted(data.test.prompt(i)[1] for i in range(5)) == [f"Blue {i}." for i in range(20, 25)]
    assert loss_text(tok, data.test[0]) == data.test.prompt(0)[1] + EOS

    only_train = tmp_path / "hf1"
    datasets.DatasetDict({"train": split(20)}).save_to_disk(str(only_train))
    carved = build_text_data(cfg(only_train, source="hf", val_fraction=0.0), tok, seed=0)  # default test_split: carve
    assert (len(carved.train), len(carved.test)) == (16, 4)
    with pytest.raises(ConfigError, match="data.test_split"):  # asked for explicitly: must exist
        build_text_data(cfg(only_train, source="hf", test_split="heldout"), tok, seed=0)

    bad = tmp_path / "hf2"
    rows = {"instruction": ["a", "b", "c"], "response": ["x", "y", ""]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"hf split 'train' row 2: field 'response' is empty"):
        build_text_data(cfg(bad, source="hf"), tok, seed=0)


# ---- mixture ---------------------------------------------------------------------------------------------------


def test_mixture_proportions_follow_the_weights(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", instructions(300))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"plain text number {i}"} for i in range(40)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}]}
                                           for i in range(90)])
    mixture = [{"source": "jsonl", "path": str(a), "weight": 2.0}, {"source": "jsonl", "path": str(b), "weight": 1.0},
               {"source": "jsonl", "path": str(c), "weight": 1.0}]
    config = DataConfig(source="jsonl", val_fraction=0.1, text={"mixture": mixture})
    data = build_text_data(config, tok, seed=0)
    assert data.format == "instruction"
    train_sizes = [240 - 24, 32 - 3, 72 - 7]  # after the test (20 %) and val (10 % of the rest) carves
    assert len(data.train) == sum(train_sizes)
    share = torch.bincount(data.train.which, minlength=3).double() / len(data.train)
    assert torch.allclose(share, torch.tensor([0.5, 0.25, 0.25], dtype=torch.double), atol=0.02)
    kinds = [data.train.stores[s].references is None for s in data.train.which.tolist()]
    assert sum(kinds) / len(kinds) == pytest.approx(0.25, abs=0.02)  # text samples come from source b
    assert len(data.test) == 60 + 8 + 18 and len(data.val) == 24 + 3 + 7  # the union of the sources' own
    batch = data.train.get_batch(torch.arange(0, len(data.train), 37))
    assert batch["input_ids"].shape[0] == len(range(0, len(data.train), 37))

    limited = build_text_data(config.model_copy(update={"limit_train": 200, "limit_eval": 20}), tok, seed=0)
    assert len(limited.train) == 200 and torch.bincount(limited.train.which).tolist() == [100, 50, 50]
    assert len(limited.test) == 20 and torch.bincount(limited.test.which).tolist() == [10, 5, 5]
    # source b (29 training samples) is repeated to fill its 50: every sample at least once
    assert set(limited.train.index[limited.train.which == 1].tolist()) == set(range(29))
    again = build_text_data(config, tok, seed=0)
    assert again.fingerprint == data.fingerprint and torch.equal(again.train.index, data.train.index)


# ---- fingerprints ----------------------------------------------------------------------------------------------


def test_fingerprints_change_with_data_and_tokenizer_only(tmp_path, tok, tok_dir):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "file.jsonl", instructions(20))
    base = build_text_data(cfg(path), tok, seed=0)
    same = build_text_data(cfg(path), AutoTokenizer.from_pretrained(tok_dir), seed=0)
    assert (same.fingerprint, same.tokenizer_fingerprint) == (base.fingerprint, base.tokenizer_fingerprint)
    assert len(base.fingerprint) == 64 and len(base.tokenizer_fingerprint) == 64

    records = instructions(20)
    records[7]["response"] = "Green."
    changed = build_text_data(cfg(write_jsonl(tmp_path / "file.jsonl", records)), tok, seed=0)
    assert changed.fingerprint != base.fingerprint and changed.tokenizer_fingerprint == base.tokenizer_fingerprint
    write_jsonl(tmp_path / "file.jsonl", instructions(20))

    other_tok = tiny_tokenizer(tmp_path / "tok2", vocab_size=280)
    other = build_text_data(cfg(path), other_tok, seed=0)
    assert other.fingerprint != base.fingerprint and other.tokenizer_fingerprint != base.tokenizer_fingerprint
    assert build_text_data(cfg(path, text={"max_length": 8}), tok, seed=0).fingerprint != base.fingerprint
    assert build_text_data(cfg(path, limit_train=5), tok, seed=0).fingerprint != base.fingerprint

    tok.chat_template = CHATML
    assert tokenizer_fingerprint(tok) != base.tokenizer_fingerprint
    assert build_text_data(cfg(path), tok, seed=0).fingerprint != base.fingerprint


def test_no_eos_is_a_config_error(tok):
    tok.eos_token = None
    with pytest.raises(ConfigError, match="no EOS"):
        TextEncoder(tok, 32)


def test_text_files_exclude_patterns(tmp_path):
    from kdkit.data.text_sources import load_text_files

    for rel in ("a.py", "pkg/b.py", "site-packages/x/c.py", "test/test_d.py"):
        f = tmp_path / "lib" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"# {rel}\nx = 1\n")
    src = load_text_files(str(tmp_path / "lib"), "**/*.py", "auto", "data", exclude=["site-packages/*", "test/*"])
    assert src.identity["files"] == ["a.py", "pkg/b.py"]
