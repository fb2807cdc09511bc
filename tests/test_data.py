import json

import datasets
import pytest
import torch

from hf_moe_routing.data import (
    IGNORE_INDEX,
    SYNTHETIC_CLASSES,
    check_context_length,
    classify_words,
    data_dir,
    load_text_dataset,
    pack_dataset,
    read_corpus,
    synthetic_corpus,
    synthetic_tokenizer,
    train_tokenizer,
)
from hf_moe_routing.testing import tiny_model

TEXTS = ["the quick brown fox jumps over the lazy dog"] * 20 + ["a stitch in time saves nine"] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_data_dir_env_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MOE_ROUTING_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir(tmp_path / ".") == tmp_path / "."
    with pytest.raises(FileNotFoundError, match="HF_MOE_ROUTING_DATA"):
        data_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tinyshakespeare"):
        read_corpus("tinyshakespeare")  # the folder exists but holds no corpus
    with pytest.raises(ValueError, match="known corpora"):
        read_corpus("wikitext-103")


def test_read_corpus_from_folder(tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("A:\nHello there.\n\nB:\nGood day.\n\n\n")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text(" \n = Title = \n \n Some text . \n")
    assert read_corpus("tinyshakespeare", tmp_path) == ["A:\nHello there.", "B:\nGood day."]
    assert read_corpus("wikitext-2/valid", tmp_path) == ["= Title =", "Some text ."]
    ds = load_text_dataset("wikitext-2/valid", data_dir=tmp_path)
    assert ds["text"] == ["= Title =", "Some text ."]


def test_train_tokenizer_roundtrip(bpe, tmp_path):
    ids = bpe("the lazy dog")["input_ids"]
    assert bpe.decode(ids) == "the lazy dog"
    assert (bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id) == (0, 1, 2)
    assert len(bpe) <= 300
    bpe.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("the lazy dog")["input_ids"] == ids
    word = train_tokenizer(["x y", "y z"], 10, kind="word", min_frequency=1)
    assert word.convert_ids_to_tokens(word("x q")["input_ids"]) == ["x", "<unk>"]


@pytest.mark.parametrize(
    "args, error",
    [((["", "  "], 300), ValueError), (("one string", 300), TypeError), ((TEXTS, 100), ValueError)],
)
def test_train_tokenizer_bad_input(args, error):
    with pytest.raises(error):
        train_tokenizer(*args)
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(TEXTS, 300, kind="unigram")


def test_pack_plain_text(bpe):
    packed = pack_dataset(TEXTS, bpe, seq_len=16)
    n_tokens = sum(len(bpe(t)["input_ids"]) + 1 for t in TEXTS)  # + EOS per text
    assert packed.column_names == ["input_ids", "attention_mask", "labels"]
    rows = packed[:]
    ids, mask, labels = rows["input_ids"], rows["attention_mask"], rows["labels"]
    assert ids.shape == (len(packed), 16) and len(packed) == -(-n_tokens // 16)
    assert int(mask.sum()) == n_tokens
    assert torch.equal(labels[mask.bool()], ids[mask.bool()])
    assert (labels[~mask.bool()] == IGNORE_INDEX).all()
    assert (ids == bpe.eos_token_id).sum() == len(TEXTS)


def test_pack_without_packing_and_too_long(bpe):
    rows = pack_dataset(TEXTS[:2], bpe, seq_len=32, packing=False)
    assert len(rows) == 2 and int(rows[0]["attention_mask"].sum()) == len(bpe(TEXTS[0])["input_ids"]) + 1
    with pytest.raises(ValueError, match="Record 0 has"):
        pack_dataset(TEXTS[:2], bpe, seq_len=4, packing=False)
    assert len(pack_dataset(TEXTS[:2], bpe, seq_len=4, packing=False, truncate=True)) == 2


def test_chat_and_prompt_records_mask_prompts():
    tok = synthetic_tokenizer()
    chat = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "add n1 n2"},
                    {"role": "assistant", "content": "is n3 ."},
                ]
            }
        ]
    )
    row = pack_dataset(chat, tok, 16, packing=False)[0]
    trained = row["input_ids"][row["labels"] != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(trained.tolist()) == ["is", "n3", ".", "</s>"]
    sft = datasets.Dataset.from_list([{"prompt": "add n1 n2", "completion": "is n3 ."}])
    row = pack_dataset(sft, tok, 12)[0]
    assert tok.convert_ids_to_tokens(row["input_ids"][:3].tolist()) == ["add", "n1", "n2"]
    assert (row["labels"][:3] == IGNORE_INDEX).all() and (row["labels"][3:7] == row["input_ids"][3:7]).all()
    only_prompts = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "add"}]}])
    with pytest.raises(ValueError, match="masked"):
        pack_dataset(only_prompts, tok, 8)


def test_load_local_files_and_errors(tmp_path, bpe):
    good = tmp_path / "d.jsonl"
    good.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS[:3]) + "\n")
    ds = load_text_dataset(good, text_field="body")
    assert ds["body"] == TEXTS[:3]
    assert len(pack_dataset(ds, bpe, 8, text_field="body")) > 0
    with pytest.raises(ValueError, match="no text field 'text'.*body"):
        load_text_dataset(good)
    txt = tmp_path / "d.txt"
    txt.write_text("one line\nanother line\n")
    assert load_text_dataset(txt, split="test")["text"] == ["one line", "another line"]
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text_dataset(empty)
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "x.bin").write_bytes(b"1")
        load_text_dataset(tmp_path / "x.bin")
    with pytest.raises(FileNotFoundError, match="network"):
        load_text_dataset("no-such-user/no-such-dataset-hf-moe-routing")
    with pytest.raises(ValueError, match="empty"):
        pack_dataset(datasets.Dataset.from_dict({"text": []}), bpe, 8)
    with pytest.raises(ValueError, match="no text"):
        pack_dataset(["", ""], bpe, 8)


def test_context_length_checks(bpe):
    with pytest.raises(ValueError, match="longer than the model context"):
        pack_dataset(TEXTS, bpe, seq_len=64, max_length=32)
    model = tiny_model("mixtral")
    check_context_length(model, model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        check_context_length(model, model.config.max_position_embeddings + 1)


def test_synthetic_language():
    texts, classes = synthetic_corpus(50, 6, seed=3, with_classes=True)
    assert texts == synthetic_corpus(50, 6, seed=3) and texts != synthetic_corpus(50, 6, seed=4)
    words = [t.split() for t in texts]
    assert all(len(w) == len(c) for w, c in zip(words, classes))
    assert {c for cs in classes for c in cs} == set(SYNTHETIC_CLASSES)
    assert all(classify_words(w) == c for w, c in zip(words, classes))
    for w in words:  # the computed words really are the computation's result
        for i, word in enumerate(w):
            if word == "add":
                assert int(w[i + 4][1]) == (int(w[i + 1][1]) + int(w[i + 2][1])) % 10
    tok = synthetic_tokenizer()
    ids = tok(texts[0])["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == texts[0]
    # a block cut mid-sentence: words before the first keyword are "other"
    assert classify_words(["n3", ".", "</s>", "say", "red"])[:3] == ["other"] * 3


def test_chat_template_records_mask_everything_but_replies():
    tok = synthetic_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}"
    chat = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "add n1 n2"},
                    {"role": "assistant", "content": "is n3"},
                    {"role": "user", "content": "rev a b"},
                    {"role": "assistant", "content": "to b a"},
                ]
            }
        ]
    )
    row = pack_dataset(chat, tok, 24, packing=False)[0]
    words = tok.convert_ids_to_tokens(row["input_ids"][row["attention_mask"].bool()].tolist())
    trained = tok.convert_ids_to_tokens(row["input_ids"][row["labels"] != IGNORE_INDEX].tolist())
    assert words[:4] == ["<unk>", "add", "n1", "n2"]  # "user" is not a word of the language
    assert trained == ["<unk>", "is", "n3", ".", "<unk>", "to", "b", "a", ".", "</s>"]


def test_batches_refuse_a_zero_batch_limit_and_empty_data():
    from hf_moe_routing.core.batching import iter_batches

    ids = torch.randint(3, 100, (4, 8))
    assert len(list(iter_batches(ids, 2, max_batches=1))) == 1
    with pytest.raises(ValueError, match="max_batches must be a positive integer"):
        list(iter_batches(ids, 2, max_batches=0))
    with pytest.raises(ValueError, match="data is empty"):
        list(iter_batches([], 2))
