"""A user-style reward for the tiny random model, loaded by dotted path ('tiny_rewards:length').

A random 2-layer model never earns accuracy or format credit, so every group ties and GRPO has no
gradient; rewarding shorter completions gives the group a spread and proves the update path.
"""


def length(max_chars: int = 200):
    def length_reward(completions, **_):
        texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
        return [1.0 - min(len(t), max_chars) / max_chars for t in texts]

    return length_reward


def first_token_only(token_id: int = 0, tokenizer=None):
    """1 when the completion starts with token `token_id`, less 1 when that token comes again later
    ('tiny_rewards:first_token_only', tests/test_grpo_learning.py).

    Any policy can climb it in a few steps (put one token first, and only there), but only by
    crediting the first position: a pull towards the token that does not care where it lands, or
    one that lands a position late (the token again after itself), costs more than it pays. Reads
    TRL's completion_ids; completion texts (the reward audit) are tokenized, when there is a tokenizer.
    """

    def first_token_only_reward(completions, completion_ids=None, **_):
        if completion_ids is None:
            if tokenizer is None:
                return [0.0] * len(completions)
            texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
            completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [float(len(ids) > 0 and ids[0] == token_id) - float(token_id in list(ids)[1:])
                for ids in completion_ids]

    return first_token_only_reward
