"""What each anomaly score needs and what its values mean: the one table of the scores.

Torch-free, so the command's help, evaluation of an artifact and `anomaly-seg bench` read it
without torch; `training.scores` (which computes the scores) re-exports it. Formulas and sign
conventions: `training.scores` and methods.md §2.4, §5.
"""

from dataclasses import asdict, dataclass
import math
from typing import Any

from anomaly_seg_node.errors import ConfigError


@dataclass(frozen=True)
class ScoreInfo:
    """What a score needs and what its values mean (exported into sidecars)."""

    name: str
    needs_outlier_head: bool
    # None: the score takes no temperature (only None or 1 are accepted).
    default_temperature: float | None
    units: str
    value_range: tuple[float, float]
    description: str
    # Computed at the experiment's temperature (config eval.temperature): the paper applies
    # T = 2 to OP, OPxMS and JSD only (methods.md §5); the others keep their default.
    tempered: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_LN2 = math.log(2.0)
SCORE_INFO: dict[str, ScoreInfo] = {
    info.name: info for info in (
        ScoreInfo('OP', True, 2.0, 'probability', (0.0, 1.0),
                  'outlier probability P(d_out|x) = softmax(outlier_logits / T)[1]',
                  tempered=True),
        ScoreInfo('OPxMS', True, 2.0, 'probability', (0.0, 1.0),
                  'outlier probability times (1 - max softmax(logits / T))', tempered=True),
        ScoreInfo('DH', True, None, 'nats', (-math.inf, math.inf),
                  'DenseHybrid log-ratio ln P(d_out|x) - logsumexp(logits)'),
        ScoreInfo('JSD', False, 2.0, 'nats', (-_LN2, 0.0),
                  'minus the Jensen-Shannon divergence of softmax(logits / T) from uniform',
                  tempered=True),
        ScoreInfo('MSP', False, 1.0, 'probability', (0.0, 1.0),
                  '1 - max softmax(logits / T)'),
        ScoreInfo('max_logit', False, None, 'logit', (-math.inf, math.inf),
                  'minus the largest class logit'),
        ScoreInfo('energy', False, 1.0, 'nats', (-math.inf, math.inf),
                  'energy -T * logsumexp(logits / T), i.e. minus the log unnormalised density'),
    )
}
SCORES: tuple[str, ...] = tuple(SCORE_INFO)
# The scores of the paper's Table I, those a training config's eval.scores may name.
EVAL_SCORES: tuple[str, ...] = ('DH', 'OP', 'OPxMS', 'JSD', 'MSP')
# The graphs of the paper's Table II (`export --all-scores`, `anomaly-seg bench`): the
# segmentation-only graph, then the scores timed beside it.
SEGMENTATION = 'segmentation'
TABLE_II_GRAPHS: tuple[str, ...] = (SEGMENTATION, 'OP', 'OPxMS', 'DH', 'JSD')


def score_info(name: str) -> ScoreInfo:
    """Metadata of a score; ConfigError for an unknown name."""
    try:
        return SCORE_INFO[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f'unknown anomaly score {name!r}; expected one of {", ".join(SCORES)}') from None


def is_tempered(name: str) -> bool:
    """Whether `name` is computed at the experiment's temperature (False for other names)."""
    info = SCORE_INFO.get(name)
    return info is not None and info.tempered


def needs_outlier_head(name: str) -> bool:
    """Whether `name` needs the outlier head (False for other names, e.g. 'segmentation')."""
    info = SCORE_INFO.get(name)
    return info is not None and info.needs_outlier_head
