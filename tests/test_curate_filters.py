import pytest
from curate_samples import GOOD_PARAGRAPH, html_page, story

from scratchlm.curate.config import (
    C4Config,
    CurateConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from scratchlm.curate.filters import c4_lines, fineweb, gopher_quality, gopher_repetition
from scratchlm.curate.pii import scrub
from scratchlm.curate.steps import StepContext, step_langid
from scratchlm.curate.text import html_to_text, normalize

GQ, GR, C4, FW = GopherQualityConfig(), GopherRepetitionConfig(), C4Config(), FineWebConfig()


def test_gopher_quality_keeps_prose_including_lowercase():
    assert gopher_quality(GOOD_PARAGRAPH, GQ) is None
    assert gopher_quality(GOOD_PARAGRAPH.lower(), GQ) is None


@pytest.mark.parametrize(
    ("text", "reason", "score"),
    [
        ("the cat and the dog. " * 4, "gopher_short_doc", 20.0),
        ("a b c d e f g h i j " * 10, "gopher_below_avg_word_length", 1.0),
        ("#tag the house of ocean and " * 20, "gopher_too_many_hashes", 1 / 6),
        ("\n".join(["- the item of and"] * 60), "gopher_too_many_bullets", 1.0),
        ("12345 67890 " * 40 + "the of and", "gopher_below_alpha_threshold", 3 / 83),
        ("lorem dolor sit amet consectetur " * 20, "gopher_enough_stop_words", 0.0),
    ],
)
def test_gopher_quality_rules(text, reason, score):
    assert gopher_quality(text, GQ) == (reason, pytest.approx(score))


def test_gopher_repetition():
    assert gopher_repetition(GOOD_PARAGRAPH, GR) is None
    para = "This paragraph says the same thing again and again to fill the page."
    assert gopher_repetition("\n\n".join([para] * 4 + [GOOD_PARAGRAPH]), GR)[0] == "dup_para_frac"
    spam = " ".join(["buy cheap shoes"] * 30) + " " + GOOD_PARAGRAPH
    rejection = gopher_repetition(spam, GR)
    assert rejection is not None and rejection[0] == "top_2_gram"
    # Duplicated 5-grams: the second copy of a 40-word passage is covered entirely.
    words = GOOD_PARAGRAPH.split()[:40]
    text = " ".join(words + [f"w{i}" for i in range(40)] + words)
    reason, frac = gopher_repetition(text, GR)
    assert reason == "duplicated_5_n_grams"
    assert frac == pytest.approx(sum(map(len, words)) / len(text))


def test_c4_drops_lines_and_rejects_documents():
    text = (
        "Home | About | Contact\nPlease enable javascript to see this page.\n"
        "We use cookies. See our privacy policy.\n" + GOOD_PARAGRAPH + "\n\nShort one.\n"
    )
    new, rejection, dropped = c4_lines(text, C4)
    assert rejection is None and dropped == 4
    assert new == GOOD_PARAGRAPH
    assert c4_lines("function f() { return 1; }. " + GOOD_PARAGRAPH, C4)[1] == (
        "curly_bracket",
        1.0,
    )
    assert c4_lines("Lorem ipsum dolor sit amet. " + GOOD_PARAGRAPH, C4)[1] == ("lorem_ipsum", 1.0)
    assert c4_lines("One sentence here. Two sentences here.", C4)[1] == ("too_few_sentences", 2.0)
    assert c4_lines("Cited fact [1] here.\n" + GOOD_PARAGRAPH, C4)[0].startswith(
        "Cited fact  here."
    )


def test_fineweb_rules():
    assert fineweb(GOOD_PARAGRAPH, FW) is None
    assert fineweb("\n".join(f"menu item {i}" for i in range(20)), FW)[0] == "line_punct_ratio"
    short = "\n".join(["Yes.", "No.", "Maybe.", GOOD_PARAGRAPH])
    assert fineweb(short, FW) == ("short_line_ratio", 0.75)
    dup = "\n".join(
        [
            GOOD_PARAGRAPH,
            "Read more about it here today.",
            story(1),
            "Read more about it here today.",
        ]
    )
    assert fineweb(dup, FW)[0] == "char_dup_ratio"
    listy = "\n".join(f"Item {i}." for i in range(30))
    assert fineweb(listy, FineWebConfig(short_line_thr=1.0))[0] == "list_ratio"


def test_normalize():
    cfg = CurateConfig()
    result = normalize("  Cafe\u0301\u00a0 bar\x07 \r\n\n\n\nnext\u200b line  ", cfg)
    assert result == ("Café bar\n\nnext line", None, 0, False)
    assert normalize(" \n\t ", cfg)[1] == ("empty document", 0.0)
    assert normalize("x" * 2_000_000, cfg)[1] == ("line too long", 2_000_000.0)
    bad_bytes = b"\xff\xfe\x00\x81" * 100 + b"some text"
    assert normalize(bad_bytes.decode("utf-8", "replace"), cfg)[1][0] == "invalid utf-8"
    text, rejection, replaced, _ = normalize("caf\ufffd au lait is good " * 5, cfg)
    assert rejection is None and replaced == 5


def test_normalize_repairs_mojibake():
    cfg = CurateConfig()
    # As in the bundled TinyStories: UTF-8 read as Windows-1252, the closing quote's last byte lost.
    text = (
        "she said, \u00e2\u20ac\u0153hi!\u00e2\u20ac "
        "he said \u00e2\u20ac\u02dcno\u00e2\u20ac\u2122."
    )
    assert normalize(text, cfg) == (
        "she said, \u201chi!\u201d he said \u2018no\u2019.",
        None,
        0,
        True,
    )
    assert normalize("fish &amp; chips \u201cfine\u201d", cfg)[0] == "fish & chips \u201cfine\u201d"
    assert normalize("plain ascii text", cfg)[3] is False


def test_html_to_text_drops_boilerplate():
    text = html_to_text(html_page(GOOD_PARAGRAPH))
    assert GOOD_PARAGRAPH in text
    assert "Home" not in text and "Copyright" not in text
    assert html_to_text("<html><body><script>var x = 1;</script></body></html>") == ""


def test_pii_replaces_emails_and_public_ips_only():
    text, emails, ips = scrub(
        "Mail jane.doe+x@example.co.uk or ops@host.org; server 8.8.8.8, local 192.168.1.1 and "
        "127.0.0.1, version 1.2.3.4.5",
        "<EMAIL>",
        "<IP>",
    )
    assert text == (
        "Mail <EMAIL> or <EMAIL>; server <IP>, local 192.168.1.1 and 127.0.0.1, version 1.2.3.4.5"
    )
    assert scrub("Visit 8.8.4.4.", "<EMAIL>", "<IP>")[0] == "Visit <IP>."
    assert (emails, ips) == (2, 1)


def test_langid_keeps_english_and_lowercase_english():
    ctx = StepContext(CurateConfig())
    for text in (GOOD_PARAGRAPH, GOOD_PARAGRAPH.lower()):
        doc = {"text": text, "meta": {}}
        assert step_langid(doc, ctx) is None
        assert doc["meta"]["language"] == "en" and doc["meta"]["language_score"] > 0.9
    doc = {"text": "Der Fluss fließt durch die alte Stadt und an der Mühle vorbei.", "meta": {}}
    assert step_langid(doc, ctx)[0] == "language de"
