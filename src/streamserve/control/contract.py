"""The score's meaning is part of a model's contract: a new version must not change it silently.

With an integer ``score_column`` the score is the probability of whichever class sits at that index, and the
index counts over the model's classes in the order the model stores them (alphabetical for scikit-learn). A
version with another class set or order would keep validating and serving while the score means P(another
class). Downstream consumers act on that number, so the swap is refused and the operator is told to name the
class (``score_column: high``), which stays right whatever the order. The label's type and the keys of the
``probabilities`` map are part of the same contract.
"""

from __future__ import annotations

from streamserve.config import ModelSettings
from streamserve.errors import ScoreContractChanged
from streamserve.pipeline.infer import OnnxModel


def score_contract_problem(settings: ModelSettings, live: OnnxModel, new: OnnxModel) -> str | None:
    """Why ``new`` would change what the published score, label or probabilities mean next to ``live``; or None."""
    if live.label_output and new.label_output and live.label_is_text != new.label_is_text:
        kinds = {True: "string", False: "int"}
        return (
            f"{new.name} {new.version} labels are {kinds[new.label_is_text]}s where {live.version}'s are "
            f"{kinds[live.label_is_text]}s: the prediction's label would change type"
        )
    if live.classes == new.classes:
        return None
    if isinstance(settings.score_column, int) and live.score_column is not None:
        return (
            f"{new.name} {new.version} has classes {list(new.classes)} where {live.version} has "
            f"{list(live.classes)}: score_column {settings.score_column} would score "
            f"{_at(new.classes, settings.score_column)!r} instead of {_at(live.classes, settings.score_column)!r}; "
            f"name the class in the config (score_column: {_at(live.classes, settings.score_column)})"
        )
    if settings.probabilities and set(live.classes) != set(new.classes):
        return (
            f"{new.name} {new.version} has classes {sorted(new.classes)} where {live.version} has "
            f"{sorted(live.classes)}: the prediction's probabilities map would change its keys"
        )
    return None


def check_score_contract(settings: ModelSettings, live: OnnxModel, new: OnnxModel) -> None:
    """Raise ScoreContractChanged when ``new`` would change the meaning of what ``live`` publishes."""
    if new is live:
        return
    problem = score_contract_problem(settings, live, new)
    if problem is not None:
        raise ScoreContractChanged(problem)


def _at(classes: tuple[str, ...], index: int) -> str:
    return classes[index] if -len(classes) <= index < len(classes) else f"(no class at {index})"
