"""Spec 2.2 / 2.3 / 2.5 on the tiny tokenizer: label masking, eos, padding and the mask quirk."""

import torch

from harness.data.encode import IGNORE, Template, collate, encode_qa, encode_text
from harness.models.load import load_tokenizer
from harness.models.tiny import TINY_TEMPLATE


def test_encode_qa_labels_answer_plus_eos(tiny_full_dir):
    tok = load_tokenizer(str(tiny_full_dir))
    item = encode_qa(tok, TINY_TEMPLATE, "Who wrote it?", "Jane Doe wrote it.")
    prompt = tok("<|user|>Who wrote it?<|assistant|>")["input_ids"]
    full = tok("<|user|>Who wrote it?<|assistant|>Jane Doe wrote it.")["input_ids"] + [tok.eos_token_id]
    assert item["input_ids"] == full
    assert item["labels"] == [IGNORE] * len(prompt) + full[len(prompt):]
    assert item["input_ids"][0] == tok.bos_token_id and item["labels"][-1] == tok.eos_token_id
    gen = encode_qa(tok, TINY_TEMPLATE, "Who wrote it?", "Jane Doe wrote it.", generate=True)
    assert gen["input_ids"] == prompt and gen["labels"] == full


def test_fewshot_and_truncation(tiny_full_dir):
    tok = load_tokenizer(str(tiny_full_dir))
    t = Template(user_start_tag="Question: ", user_end_tag="\n", asst_start_tag="Answer: ", asst_end_tag="\n\n")
    item = encode_qa(tok, t, "q?", "a.", fewshot=[("q1?", "a1."), ("q2?", "a2.")], generate=True)
    assert tok.decode(item["input_ids"], skip_special_tokens=True) == "Question: q1?\nAnswer: a1.\n\nQuestion: q2?\nAnswer: a2.\n\nQuestion: q?\nAnswer: "
    long = encode_qa(tok, t, "q " * 50, "a " * 50, max_length=20)
    assert len(long["input_ids"]) == 21  # truncated to max_length, then eos appended


def test_encode_text_ignores_bos_and_appends_no_eos(tiny_full_dir):
    tok = load_tokenizer(str(tiny_full_dir))
    item = encode_text(tok, "", "some news text here", max_length=3)
    assert item["input_ids"][0] == tok.bos_token_id and len(item["input_ids"]) == 4
    assert item["labels"][0] == IGNORE and item["labels"][1:] == item["input_ids"][1:]
    assert tok.eos_token_id not in item["input_ids"]
    comp = encode_text(tok, "The prompt", "the rest", max_length=100, insert_space=True)
    n = len(tok("The prompt")["input_ids"])
    assert comp["labels"][:n] == [IGNORE] * n and all(x != IGNORE for x in comp["labels"][n:])


def test_collate_pad_eq_quirk_and_left_padding():
    items = [{"input_ids": [1, 5, 2], "labels": [IGNORE, 5, 2]}, {"input_ids": [1, 2, 6, 7, 2], "labels": [IGNORE, IGNORE, 6, 7, 2]}]
    b = collate(items, pad_id=2)  # pad = eos = 2, as Llama-3 with the reference fix
    assert b["input_ids"].tolist() == [[1, 5, 2, 2, 2], [1, 2, 6, 7, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 1, 1, 0]]  # every eos hidden
    assert b["labels"].tolist() == [[IGNORE, 5, 2, IGNORE, IGNORE], [IGNORE, IGNORE, 6, 7, 2]]
    c = collate(items, pad_id=2, mask="corrected", side="left")
    assert c["input_ids"].tolist()[0] == [2, 2, 1, 5, 2]
    assert c["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert c["input_ids"].dtype == torch.long
