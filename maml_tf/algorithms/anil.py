"""ANIL (Raghu et al. 2020): the inner loop adapts the head only."""

from __future__ import annotations

from maml_tf.data.episode import Episode
from maml_tf.meta_learner import MetaLearner
from maml_tf.models.functional import tile_for_tasks, with_support_statistics


class ANIL(MetaLearner):
    """ANIL (Raghu et al. 2020): Almost No Inner Loop. The body (every layer before the
    head) is meta-learned but never adapted, so its features are computed once per task;
    only the head runs the inner loop (a second-order MAML of a linear classifier)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.body, head = self.net.split_head()
        self.head_learner = MetaLearner(head, **kwargs)

    def _features(self, weights, episode: Episode) -> tuple[list, Episode]:
        nb = len(self.body.variables)
        body = tile_for_tasks(weights[:nb], episode.support_x.shape[0])
        embed = lambda x: self.apply_in_compute_dtype(self.body, body, x)
        mode = self._eval_mode
        if mode is not None and mode.mode == "support":
            # The body's batch norm normalises the queries with the support set's statistics.
            support, query = with_support_statistics(lambda: embed(episode.support_x),
                                                     lambda: embed(episode.query_x))
        else:
            support, query = embed(episode.support_x), embed(episode.query_x)
        return body, episode._replace(support_x=support, query_x=query)

    @property
    def normalises_queries_with_support(self) -> bool:
        return True

    def meta_loss(self, weights, episode, steps, first_order=None, track_steps=True,
                  iteration=None):
        _, features = self._features(weights, episode)
        nb = len(self.body.variables)
        return self.head_learner.meta_loss(list(weights[nb:]), features, steps, first_order,
                                           track_steps, iteration)

    def query_predictions(self, weights, episode, steps):
        _, features = self._features(weights, episode)
        nb = len(self.body.variables)
        return self.head_learner.query_predictions(list(weights[nb:]), features, steps)

    def inner_loop(self, weights, x, y, steps, first_order=None):
        """Fast weights of the whole network: the body's are the meta-weights at every step."""
        body, features = self._features(weights, Episode(x, y, x, y))
        nb = len(self.body.variables)
        heads = self.head_learner.inner_loop(list(weights[nb:]), features.support_x, y, steps,
                                             first_order)
        return [body + head for head in heads]
