"""The published numbers that ``maml_tf.report`` prints beside ours, with their sources, and
the data sets' names as the tables write them."""

from __future__ import annotations

# (dataset, way, shot, algorithm) -> the published number and its source. Way is None for
# regression and RL, shot None for RL.
PAPER: dict[tuple, str] = {
    ("omniglot", 5, 1, "maml"): "98.7 ± 0.4 % (Finn et al. 2017)",
    ("omniglot", 5, 5, "maml"): "99.9 ± 0.1 % (Finn et al. 2017)",
    ("omniglot", 20, 1, "maml"): "95.8 ± 0.3 % (Finn et al. 2017)",
    ("omniglot", 20, 5, "maml"): "98.9 ± 0.2 % (Finn et al. 2017)",
    ("omniglot", 5, 1, "fomaml"): "98.3 ± 0.5 % (Finn et al. 2017)",
    ("omniglot", 5, 5, "fomaml"): "99.2 ± 0.2 % (Finn et al. 2017)",
    ("omniglot", 20, 1, "fomaml"): "89.4 ± 0.5 % (Finn et al. 2017)",
    ("omniglot", 20, 5, "fomaml"): "97.9 ± 0.1 % (Finn et al. 2017)",
    ("mini_imagenet", 5, 1, "maml"): "48.70 ± 1.84 % (Finn et al. 2017)",
    ("mini_imagenet", 5, 5, "maml"): "63.11 ± 0.92 % (Finn et al. 2017)",
    ("mini_imagenet", 5, 1, "fomaml"): "48.07 ± 1.75 % (Finn et al. 2017)",
    ("mini_imagenet", 5, 5, "fomaml"): "63.15 ± 0.91 % (Finn et al. 2017)",
    ("omniglot", 5, 1, "reptile"): "97.68 ± 0.04 % (Nichol et al. 2018, transductive)",
    ("omniglot", 5, 1, "metasgd"): "99.53 ± 0.26 % (Li et al. 2017)",
    ("omniglot", 5, 1, "mamlpp"): "99.47 ± 0.05 % (Antoniou et al. 2019)",
    ("omniglot", 5, 1, "imaml"): "99.16 ± 0.35 % (Rajeswaran et al. 2019)",
    ("omniglot", 5, 1, "protonet"): "98.8 % (Snell et al. 2017, 60-way training)",
    ("omniglot", 5, 1, "matching"): "98.1 % (Vinyals et al. 2016)",
    ("omniglot", 5, 1, "relation"): "99.6 ± 0.2 % (Sung et al. 2018)",
    ("omniglot", 5, 1, "snail"): "99.07 ± 0.16 % (Mishra et al. 2018)",
    ("omniglot", 5, 5, "snail"): "99.78 ± 0.09 % (Mishra et al. 2018)",
    ("omniglot", 20, 1, "snail"): "97.64 ± 0.30 % (Mishra et al. 2018)",
    ("omniglot", 20, 5, "snail"): "99.36 ± 0.18 % (Mishra et al. 2018)",
    ("omniglot", 5, 1, "cnp"): "95.3 % (Garnelo et al. 2018)",
    ("sinusoid", None, 5, "maml"): "0.35 after 10 steps (Finn et al. 2017)",
    ("sinusoid", None, 5, "pretrain"): "2.19 after 10 steps (Finn et al. 2017)",
    ("navigation_2d", None, None, "maml"): "-3.23 after 3 steps (Finn et al. 2017)",
    ("navigation_2d", None, None, "random"): "-46.8 after 3 steps (Finn et al. 2017)",
    ("navigation_2d", None, None, "oracle"): "-2.29 (Finn et al. 2017)",
    ("halfcheetah_vel", None, None, "maml"): "-60.8 after 3 steps (maml_rl)",
    ("halfcheetah_dir", None, None, "maml"): "315.7 after 3 steps (maml_rl)",
}

DATASET_NAMES = {"omniglot": "Omniglot", "mini_imagenet": "mini-ImageNet",
                  "sinusoid": "sinusoid", "navigation_2d": "2D navigation",
                  "halfcheetah_vel": "HalfCheetah velocity",
                  "halfcheetah_dir": "HalfCheetah direction"}
