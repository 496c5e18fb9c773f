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
