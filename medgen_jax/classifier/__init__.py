"""The condition classifier: one network, its training, its cache and a recipe per use.

`FeatureNet` (`network`) is a small CNN with one head per condition field.
It is trained on the real train split (`training`) from a `Recipe`
(`recipe`) and cached beside the dataset under a key of the dataset and the
recipe (`cache`). Its uses, each with its own recipe and config section:

    use                          config section         read by
    evaluation extractor/judge   config.eval.extractor_*  medgen_jax.eval.settings
    training condition teacher   config.teacher         medgen_jax.train.loop
    best-of-K sample selector    config.selector        medgen_jax.inference.sample
    downstream classifier        config.classifier      medgen_jax.studies.classification

    recipe = classifier.from_section(config.teacher)
    model, params, meta = classifier.get_classifier(recipe, config.data, info)
    features = classifier.extract_features(model, params, images)   # [N, feature_dim]
"""
from medgen_jax.classifier.cache import cache_key, cache_path, get_classifier, init_classifier
from medgen_jax.classifier.network import (FeatureNet, condition_loss, condition_targets,
                                           per_example_condition_loss)
from medgen_jax.classifier.recipe import Recipe, from_section, section_values
from medgen_jax.classifier.training import (extract_features, is_pretext, predict_conditions,
                                            pretext_accuracy, train_feature_extractor)

__all__ = ["FeatureNet", "Recipe", "cache_key", "cache_path", "condition_loss",
           "condition_targets", "extract_features", "from_section", "get_classifier",
           "init_classifier", "is_pretext", "per_example_condition_loss",
           "predict_conditions", "pretext_accuracy", "section_values",
           "train_feature_extractor"]
