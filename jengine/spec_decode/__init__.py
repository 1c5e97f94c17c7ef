"""Speculative decoding building blocks: draft proposers and the rejection sampler that verifies drafts.

    NgramProposer(k, prompt_lookup_min, prompt_lookup_max).propose(token_ids) -> list[int]
    rejection_sample(target_probs, draft_token_ids, num_draft, draft_probs, uniforms) -> (tokens, num_tokens)
    draft_model.DraftModel                    a smaller model's greedy drafts, its KV cache on the target's pages

A proposer guesses the next few tokens cheaply; the target model scores the row's last token plus every
draft in one step, and `rejection_sample` keeps a prefix of the drafts and adds one token of its own so
that the emitted tokens follow the target distribution exactly (Leviathan et al. 2023; Chen et al.
2023), at any temperature and after every logits processor. The step loop wires these in (step v2).
"""
from jengine.spec_decode.ngram import NgramProposer
from jengine.spec_decode.rejection import rejection_sample

__all__ = ["NgramProposer", "rejection_sample"]
