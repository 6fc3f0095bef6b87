"""FID (Fréchet Inception distance) as an `evaluate` module, computed as the ADM evaluation suite does.

Load it with `arpg_hf.load_metric("fid")` or `evaluate.load(<this folder>)`; offline, no Hub access.
"""

import evaluate

from arpg_hf.metrics.evaluate_support import (
    EXTRACTOR_ARGS_DOC,
    UnequalLengthsMixin,
    extractor_for,
    features_of,
    metric_features,
)
from arpg_hf.metrics.frechet import feature_statistics, frechet_distance_from_statistics
from arpg_hf.metrics.sample_batch import load_reference_statistics

_DESCRIPTION = """
Fréchet distance between Gaussians fitted to the Inception-v3 pool features (2048) of generated and reference
images: |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2)), covariances unbiased, computed in float64.
Lower is better; 0 for identical feature sets.
"""

_KWARGS_DESCRIPTION = (
    """
Args:
    predictions: generated images (default / "statistics" configurations) or their pool features ("features").
    references: reference images, or their pool features ("features"); not used by "statistics".
    reference_statistics: "statistics" configuration only: an ADM reference batch .npz with mu/sigma, or (mu, sigma).
"""
    + EXTRACTOR_ARGS_DOC
    + """
Returns:
    fid (`float`).
Examples:
    >>> fid = arpg_hf.load_metric("fid", config_name="features")
    >>> fid.compute(predictions=features_a, references=features_b)["fid"]
"""
)

_CITATION = """
@inproceedings{heusel2017gans, title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium}, author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and
Hochreiter, Sepp}, booktitle={NeurIPS}, year={2017}}
"""


class FID(UnequalLengthsMixin, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=metric_features("fid", self.config_name),
        )

    def _compute(
        self,
        predictions,
        references=None,
        reference_statistics=None,
        feature_extractor=None,
        inception_weights=None,
        batch_size=50,
        device=None,
    ):
        extractor = extractor_for(self.config_name, feature_extractor, inception_weights, device)
        generated = features_of(predictions, self.config_name, "pool", extractor, batch_size)
        if self.config_name == "statistics":
            if reference_statistics is None:
                raise ValueError("config_name='statistics' needs reference_statistics= (an ADM .npz or (mu, sigma)).")
            reference = load_reference_statistics(reference_statistics)
        else:
            if reference_statistics is not None:
                raise ValueError("reference_statistics is for config_name='statistics'; here pass references=.")
            reference = feature_statistics(
                features_of(references, self.config_name, "pool", extractor, batch_size, name="references")
            )
        return {"fid": frechet_distance_from_statistics(*feature_statistics(generated), *reference)}
