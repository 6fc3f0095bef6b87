"""Inception score as an `evaluate` module, computed as the ADM evaluation suite does (splits of 5000 samples).

Load it with `arpg_hf.load_metric("inception_score")` or `evaluate.load(<this folder>)`; offline, no Hub access.
"""

import evaluate

from arpg_hf.metrics.evaluate_support import EXTRACTOR_ARGS_DOC, extractor_for, features_of, metric_features
from arpg_hf.metrics.inception_scoring import DEFAULT_SPLIT_SIZE, inception_score

_DESCRIPTION = """
exp(E_x KL(p(y|x) || p(y))) with p(y|x) the softmax of Inception-v3's 1008 unbiased logits and p(y) their mean,
per split of `split_size` generated images; the score is the mean over splits. Higher is better.
"""

_KWARGS_DESCRIPTION = (
    """
Args:
    predictions: generated images, or their classifier logits (config_name="features").
    split_size (`int`, *optional*, defaults to 5000): images per split.
"""
    + EXTRACTOR_ARGS_DOC
    + """
Returns:
    inception_score (`float`): mean over splits; inception_score_std (`float`): their standard deviation.
"""
)

_CITATION = """
@inproceedings{salimans2016improved, title={Improved Techniques for Training GANs}, author={Salimans, Tim and
Goodfellow, Ian and Zaremba, Wojciech and Cheung, Vicki and Radford, Alec and Chen, Xi}, booktitle={NeurIPS},
year={2016}}
"""


class InceptionScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=metric_features("inception_score", self.config_name),
        )

    def _compute(
        self,
        predictions,
        split_size=DEFAULT_SPLIT_SIZE,
        feature_extractor=None,
        inception_weights=None,
        batch_size=50,
        device=None,
    ):
        extractor = extractor_for(self.config_name, feature_extractor, inception_weights, device)
        logits = features_of(predictions, self.config_name, "logits", extractor, batch_size)
        mean, std = inception_score(logits, split_size=split_size)
        return {"inception_score": mean, "inception_score_std": std}
