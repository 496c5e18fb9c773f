import pytest

from stylelora.errors import UserError
from stylelora.sample.prompts import SamplePrompt, parse_prompt_file, parse_prompt_line

DEFAULTS = SamplePrompt(prompt="", width=64, height=64, seed=0, guidance_scale=7.5, steps=20)


def test_kohya_flags_override_defaults():
    p = parse_prompt_line(
        "a cat, --dashes-in-text ok --n blurry, ugly --w 512 --h 768 --d 42 --l 5.5 --s 28",
        DEFAULTS,
    )
    assert p == SamplePrompt(
        prompt="a cat, --dashes-in-text ok",
        negative_prompt="blurry, ugly",
        width=512,
        height=768,
        seed=42,
        guidance_scale=5.5,
        steps=28,
    )


def test_plain_prompt_keeps_defaults():
    assert parse_prompt_line("  just a prompt ", DEFAULTS) == SamplePrompt(
        "just a prompt", width=64, height=64
    )


def test_file_skips_comments_and_names_bad_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\nfirst --d 1\nsecond --s many\n")
    with pytest.raises(UserError, match=r"prompts.txt:4: --s needs a int, got 'many'"):
        parse_prompt_file(path, DEFAULTS)
    path.write_text("# comment\n\nfirst --d 1\nsecond --q 3\n")
    with pytest.raises(UserError, match=r"prompts.txt:4: unknown flag --q"):
        parse_prompt_file(path, DEFAULTS)
    path.write_text("first --d 1\n  # indented comment\nsecond\n")
    assert [p.prompt for p in parse_prompt_file(path, DEFAULTS)] == ["first", "second"]


@pytest.mark.parametrize(
    "line, expected",
    [
        # Flags in any order; a later flag wins over an earlier one.
        ("a dog --s 10 --d 5 --s 12", {"prompt": "a dog", "steps": 12, "seed": 5}),
        # Runs of spaces and tabs around flags and values.
        ("a  dog \t--w   128\t--h 96  ", {"prompt": "a  dog", "width": 128, "height": 96}),
        # The negative prompt runs to the next flag, commas and parentheses included.
        (
            "(masterpiece), a cat --n (worst quality:1.4), blurry --l 7",
            {
                "prompt": "(masterpiece), a cat",
                "negative_prompt": "(worst quality:1.4), blurry",
                "guidance_scale": 7.0,
            },
        ),
        # A flag with no value clears the negative prompt; `--` inside words is text.
        ("a well--lit room --n", {"prompt": "a well--lit room", "negative_prompt": ""}),
        ("negative seeds work --d -3", {"prompt": "negative seeds work", "seed": -3}),
        # Flags are case-insensitive, as in kohya.
        ("upper --W 96 --H 32 --N ugly", {"width": 96, "height": 32, "negative_prompt": "ugly"}),
    ],
)
def test_kohya_syntax_cases(line, expected):
    parsed = parse_prompt_line(line, DEFAULTS)
    for field, value in expected.items():
        assert getattr(parsed, field) == value, field


@pytest.mark.parametrize(
    "line, message",
    [
        ("--w 64", "the line has flags but no prompt"),
        ("a cat --w", "--w needs a int, got ''"),
        ("a cat --l high", "--l needs a float, got 'high'"),
        ("a cat --x 64", "unknown flag --x"),
    ],
)
def test_bad_lines_say_which_flag(line, message):
    with pytest.raises(ValueError) as info:
        parse_prompt_line(line, DEFAULTS)
    assert message in str(info.value)


def test_file_with_crlf_line_endings_and_a_bom_free_utf8_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("café au lait --d 7\r\n# note\r\nnuit étoilée --w 96\r\n".encode())
    prompts = parse_prompt_file(path, DEFAULTS)
    assert [(p.prompt, p.seed, p.width) for p in prompts] == [
        ("café au lait", 7, 64),
        ("nuit étoilée", 0, 96),
    ]
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="not UTF-8"):
        parse_prompt_file(path, DEFAULTS)
