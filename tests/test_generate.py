"""The evaluation's greedy generator: the same answers as the plainest greedy decoding, however the
prompts are batched, prefixed and dropped out of the batch."""
import pytest
import torch

from mscp.core.prompts import chat_ids, load_tokenizer
from mscp.harness.generate import Generator, length_batches, row_groups, shared_prefix_length
from mscp.harness.organism import tiny_base

PROMPTS = ["hi", "How do I bake bread at home?", "a", "Tell me a long story about a lighthouse keeper and a storm",
           "2 + 2 = ?", "What is the capital of France", "x y z", "Write a poem", "why"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_base(tmp_path_factory.mktemp("tiny"), hidden=64, layers=3, vocab=512, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # weights large enough that every answer token depends on the context
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    return model, load_tokenizer(path)


def reference_tokens(model, tok, prompt: str, n: int, eos: set[int], chat_template: bool = True) -> list[int]:
    """Greedy decoding one prompt at a time, no cache: the whole sequence runs again for each token."""
    ids, out = chat_ids(tok, prompt, chat_template), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
    return out


def reference(model, tok, prompt: str, n: int, eos: set[int], chat_template: bool = True) -> str:
    return tok.decode(reference_tokens(model, tok, prompt, n, eos, chat_template), skip_special_tokens=True).strip()


@pytest.mark.parametrize("batch_size, decode_rows", [(1, 1), (2, None), (3, 4), (64, None), (4, 64)])
def test_answers_equal_plain_greedy_decoding(tiny, batch_size, decode_rows):
    model, tok = tiny
    gen = Generator(model, tokenizer=tok)
    want = [reference(model, tok, p, 7, gen.eos) for p in PROMPTS]
    assert gen.generate(PROMPTS, max_new_tokens=7, batch_size=batch_size, decode_rows=decode_rows) == want


def test_a_row_that_answers_leaves_the_batch_and_the_others_go_on(tiny):
    model, tok = tiny
    gen = Generator(model, tokenizer=tok)
    # an EOS that some prompts emit early and others never: their rows leave mid-batch
    free = [reference_tokens(model, tok, p, 9, set()) for p in PROMPTS]
    stop_at = lambda t: [f.index(t) if t in f else 9 for f in free]  # noqa: E731 - answer lengths with EOS t
    gen.eos = {next(t for f in free for t in f if max(stop_at(t)) == 9 and any(0 < n < 9 for n in stop_at(t)))}
    want = [reference(model, tok, p, 9, gen.eos) for p in PROMPTS]
    assert gen.generate(PROMPTS, max_new_tokens=9, batch_size=4) == want


def test_prompts_without_a_shared_prefix(tiny):
    model, tok = tiny
    gen = Generator(model, tokenizer=tok, chat_template=False)
    prompts = ["zebra crossing", "apple pie", "Quick brown fox jumps"]
    seqs = [chat_ids(tok, p, False) for p in prompts]
    assert shared_prefix_length(seqs) == 0
    want = [reference(model, tok, p, 5, gen.eos, chat_template=False) for p in prompts]
    assert gen.generate(prompts, max_new_tokens=5, batch_size=2) == want


@pytest.mark.parametrize("max_new_tokens", [0, 1])
def test_the_shortest_answers(tiny, max_new_tokens):
    model, tok = tiny
    gen = Generator(model, tokenizer=tok)
    want = [reference(model, tok, p, max_new_tokens, gen.eos) for p in PROMPTS[:4]]
    assert gen.generate(PROMPTS[:4], max_new_tokens=max_new_tokens, batch_size=2) == want


@pytest.mark.parametrize("seqs, n", [([[1, 2, 3], [1, 2, 4]], 2), ([[1, 2], [1, 2, 3]], 1), ([[5]], 0),
                                     ([[1, 2, 3], [1, 2, 3]], 2), ([[1], [2]], 0)])
def test_the_shared_prefix_leaves_each_prompt_a_token(seqs, n):
    assert shared_prefix_length(seqs) == n


@pytest.mark.parametrize("lengths, batch_size", [([1] * 10, 3), ([1, 2, 3, 50, 51, 52, 200], 4), ([7], 1),
                                                 (list(range(1, 40)), 8)])
def test_length_batches_cover_every_prompt_once_in_order(lengths, batch_size):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = length_batches(order, lengths, batch_size)
    assert [i for b in batches for i in b] == order
    assert all(0 < len(b) <= batch_size for b in batches)
    for b in batches:  # a batch over 10 % padding is one that could not be split
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or (len(b) * width - sum(lengths[i] for i in b)) <= 0.1 * len(b) * width


def test_row_groups_keep_batches_whole_and_within_the_rows():
    batches = [[0, 1], [2, 3, 4], [5], [6, 7, 8, 9, 10], [11]]
    groups = row_groups(batches, 5)
    assert [b for g in groups for b in g] == batches
    assert all(sum(map(len, g)) <= 5 for g in groups)
    assert groups == [[[0, 1], [2, 3, 4]], [[5]], [[6, 7, 8, 9, 10]], [[11]]]
