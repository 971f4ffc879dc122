"""The OMS text is the prompt the WebUI uses at the first step, with its emphasis weights.

The rules (A1111 1.10.1 / Forge ``modules/prompt_parser.py``, ``modules/extra_networks.py``,
``modules/sd_emphasis.py``) are checked here on oms_ext's own implementation, PlainSyntax; the
opt-in test at the end compares it with the WebUI's parser itself."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

from oms_ext import load_oms
from oms_ext.prompt_syntax import (
    PlainSyntax,
    TextRules,
    WeightedPrompt,
    first_step_prompt,
)
from oms_ext.text import PROMPT_TOKENS, apply_emphasis
from tests import webui_standins as wi

SYNTAX = PlainSyntax()


def read(prompt: str, steps: int = 20, **kwargs) -> WeightedPrompt:
    return first_step_prompt(prompt, SYNTAX, steps, **kwargs)


@pytest.mark.parametrize(
    ("prompt", "steps", "text"),
    [
        ("[day:night:0.2] street", 4, "night street"),  # int(0.2 * 4) = 0: night from step 1
        ("[day:night:0.2] street", 20, "day street"),
        ("[day:night:0] street", 20, "night street"),
        ("a [hat:0.2] cat", 4, "a hat cat"),  # [to:when]: "to" already at the first step
        ("a [hat:3] cat", 20, "a  cat"),
        ("a [hat::0.2] cat", 4, "a  cat"),  # [from::when]: "from" is gone at once
        ("a [hat::3] cat", 20, "a hat cat"),
        ("[cat|dog|fox] in snow", 20, "cat in snow"),
        ("a[b:[c:d:2]:1]e", 10, "abe"),
    ],
)
def test_prompt_editing_is_read_at_the_first_step_as_the_webui_counts_steps(prompt, steps, text):
    assert read(prompt, steps).text == text


def test_and_parts_weighted_zero_or_below_never_reach_the_oms_text():
    assert str(read("a room AND bright daylight :-0.8")) == "a room"
    assert str(read("a room :1.2 AND moonlight :0")) == "a room"
    assert str(read("a room AND a window :0.5")) == "a room, a window"


@pytest.mark.parametrize(
    ("prompt", "text"),
    [("a (sunlight:0) room", "a  room"), ("(bright:-1) room", " room"), ("[(x:0):0.3] y", " y")],
)
def test_words_weighted_zero_or_below_never_reach_the_oms_text(prompt, text):
    assert read(prompt).text == text


def test_emphasis_gives_each_word_its_multiplier():
    got = read("a (dark:1.4) ((night)) [fog] room")
    assert got.fragments == (
        ("a ", 1.0),
        ("dark", 1.4),
        (" ", 1.0),
        ("night", pytest.approx(1.21)),
        (" ", 1.0),
        ("fog", pytest.approx(1 / 1.1)),
        (" room", 1.0),
    )
    assert str(got) == "a (dark:1.4) (night:1.21) (fog:0.909) room"


def test_extra_network_tags_are_removed_and_break_separates_like_a_comma():
    assert read("<lora:dark:0.8>night BREAK <hypernet:x:1>city").text == "night, city"


@pytest.mark.parametrize(
    ("emphasis", "fragments", "restore_mean"),
    [
        ("Original", (("dark", 1.4), (" night", 1.0)), True),
        ("No norm", (("dark", 1.4), (" night", 1.0)), False),
        ("Ignore", (("dark night", 1.0),), True),
        ("None", (("(dark:1.4) night", 1.0),), True),
    ],
)
def test_the_webuis_emphasis_modes(emphasis, fragments, restore_mean):
    got = read("(dark:1.4) night", emphasis=emphasis)
    assert got.fragments == fragments and got.restore_mean is restore_mean


def test_negative_prompts_are_not_split_at_and():
    assert read("a AND b :-1", composable=False).text == "a AND b :-1"


def test_text_rules_read_with_the_webuis_step_count_and_emphasis():
    rules = TextRules(SYNTAX, steps=4, emphasis="Ignore")
    assert rules.read("[(day:1.3):night:0.5] street").fragments == (("day street", 1.0),)


# --- emphasis on the text states -----------------------------------------------------------


def test_emphasis_scales_token_states_and_restores_their_mean():
    states = torch.randn(2, 77, 8) + 0.3
    mult = torch.ones(2, 77)
    mult[0, 1:3] = torch.tensor([1.4, 0.5])
    out = apply_emphasis(states, mult, [True, True])
    expected = states[0] * mult[0][:, None]
    expected = expected * (states[0].mean() / expected.mean())
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], states[1], atol=0, rtol=0)  # no weights: untouched
    assert not_norm(states, mult)


def not_norm(states, mult) -> bool:
    """"No norm" scales without the rescale."""
    out = apply_emphasis(states, mult, [False, False])
    return torch.allclose(out[0], states[0] * mult[0][:, None])


def test_emphasis_on_states_whose_scaled_mean_is_zero_skips_the_rescale():
    states = torch.zeros(1, 77, 4)
    states[0, 1] = 1.0
    states[0, 2] = -1.0
    mult = torch.ones(1, 77)
    mult[0, 1] = 2.0
    mult[0, 2] = 2.0
    out = apply_emphasis(states, mult, [True])
    assert torch.isfinite(out).all() and out[0, 1, 0] == 2.0


@pytest.fixture(scope="module")
def tiny():
    return load_oms(wi.TINY_MODULE)


def test_a_weighted_word_means_more_of_that_word_in_the_oms_text_states(tiny):
    plain = tiny.encode(["dark night"])
    weighted = tiny.encode([read("(dark:1.4) night")])
    batch = tiny.text_encoder.tokenizer([read("(dark:1.4) night")])
    raw = tiny.text_encoder.encode_ids(batch.ids)
    torch.testing.assert_close(plain, raw)  # same tokens as the plain prompt
    expected = apply_emphasis(raw, batch.multipliers, [True])
    torch.testing.assert_close(weighted, expected)
    assert batch.multipliers[0, 1].item() == pytest.approx(1.4)  # "dark" after start-of-text
    assert not torch.allclose(weighted, plain)


def test_a_plain_prompt_tokenizes_exactly_as_before(tiny):
    prompts = ["a photo of a cat!!", "", "vivid blue & yellow, (not weighted)"]
    hf = tiny.text_encoder.tokenizer.tokenizer
    expected = hf(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert tiny.text_encoder.tokenizer(prompts).ids.tolist() == expected


def test_tokens_past_75_are_counted_so_the_cut_can_be_reported(tiny):
    long = " ".join(["word"] * 90)
    assert tiny.count_tokens([long, "a cat"]) == [90, 2]
    assert tiny.text_encoder.tokenizer([long]).ids[0, PROMPT_TOKENS + 1].item() == 49407


# --- the WebUI's own parser (opt-in) --------------------------------------------------------

WEBUI_PARSER = os.environ.get("OMS_WEBUI_PROMPT_PARSER", "")


@pytest.mark.skipif(
    not WEBUI_PARSER,
    reason="set OMS_WEBUI_PROMPT_PARSER to a WebUI's modules/prompt_parser.py (needs lark)",
)
def test_plain_syntax_reads_prompts_as_the_webuis_parser_does():
    spec = importlib.util.spec_from_file_location("webui_prompt_parser", Path(WEBUI_PARSER))
    parser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parser)
    pieces = [*"ab ()[]:|\\.,0123-+", "BREAK", "1.5", "0.3", " AND ", ":0.5", "[a:b:", "[c|d]"]
    rng = random.Random(7)
    prompts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(3000)]
    for prompt in prompts:
        try:
            attention = [tuple(run) for run in parser.parse_prompt_attention(prompt)]
        except ValueError:  # the WebUI itself fails on weights such as ":1.2.3)"
            continue
        assert SYNTAX.attention(prompt) == attention, prompt
        for steps in (4, 20):
            schedule = parser.get_learned_conditioning_prompt_schedules([prompt], steps)[0]
            assert SYNTAX.first_step_text(prompt, steps) == schedule[0][1], (prompt, steps)
        indexes, flat, _ = parser.get_multicond_prompt_list([prompt])
        assert SYNTAX.composable_parts(prompt) == [(flat[i], w) for i, w in indexes[0]], prompt
