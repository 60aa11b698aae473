"""A user-style reward for the tiny random model, loaded by dotted path ('tiny_rewards:length').

A random 2-layer model never earns accuracy or format credit, so every group ties and GRPO has no
gradient; rewarding shorter completions gives the group a spread and proves the update path.
"""


def length(max_chars: int = 200):
    def length_reward(completions, **_):
        texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
        return [1.0 - min(len(t), max_chars) / max_chars for t in texts]

    return length_reward
