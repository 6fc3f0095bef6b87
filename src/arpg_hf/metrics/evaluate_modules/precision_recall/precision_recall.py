"""Improved precision and recall (k-NN manifolds, k = 3) as an `evaluate` module, computed as the ADM suite does.

Load it with `arpg_hf.load_metric("precision_recall")` or `evaluate.load(<this folder>)`; offline, no Hub access.
"""

import evaluate

from arpg_hf.metrics.evaluate_support import (
    EXTRACTOR_ARGS_DOC,
    UnequalLengthsMixin,
    extractor_for,
    features_of,
    metric_features,
)
from arpg_hf.metrics.manifold import DEFAULT_NEAREST_K, precision_recall

_DESCRIPTION = """
Each feature set (Inception-v3 pool features) spans a manifold: balls around its samples with the squared distance to
the k-th nearest neighbour in the same set as radius. Precision: share of generated samples inside the reference
manifold. Recall: share of reference samples inside the generated manifold.
"""

_KWARGS_DESCRIPTION = (
    """
Args:
    predictions: generated images, or their pool features (config_name="features").
    references: reference images, or their pool features (config_name="features").
    nearest_k (`int`, *optional*, defaults to 3): the neighbour that sets each radius.
"""
    + EXTRACTOR_ARGS_DOC
    + """
Returns:
    precision (`float`), recall (`float`).
"""
)

_CITATION = """
@inproceedings{kynkaanniemi2019improved, title={Improved Precision and Recall Metric for Assessing Generative Models},
author={Kynk{\\"a}{\\"a}nniemi, Tuomas and Karras, Tero and Laine, Samuli and Lehtinen, Jaakko and Aila, Timo},
booktitle={NeurIPS}, year={2019}}
"""


class PrecisionRecall(UnequalLengthsMixin, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=metric_features("precision_recall", self.config_name),
        )

    def _compute(
        self,
        predictions,
        references,
        nearest_k=DEFAULT_NEAREST_K,
        feature_extractor=None,
        inception_weights=None,
        batch_size=50,
        device=None,
    ):
        extractor = extractor_for(self.config_name, feature_extractor, inception_weights, device)
        generated = features_of(predictions, self.config_name, "pool", extractor, batch_size)
        reference = features_of(references, self.config_name, "pool", extractor, batch_size, name="references")
        precision, recall = precision_recall(reference, generated, nearest_k=nearest_k)
        return {"precision": precision, "recall": recall}
