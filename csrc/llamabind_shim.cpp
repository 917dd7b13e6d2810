// llamabind's C++ shim (see llamabind_shim.h): nothing thrown by llama.cpp crosses into C.
#define LLAMABIND_SHIM_BUILD
#include "llamabind_shim.h"

#include <cmath>
#include <cstdio>
#include <exception>
#include <vector>

namespace {

int32_t fail(char * err, size_t err_size, const char * what) {
    if (err != nullptr && err_size > 0) {
        std::snprintf(err, err_size, "%s", what);
    }
    return -1;
}

}  // namespace

extern "C" int32_t llamabind_sampler_accept(llama_sampler * smpl, llama_token token, char * err, size_t err_size) {
    try {
        llama_sampler_accept(smpl, token);
        return 0;
    } catch (const std::exception & e) {
        return fail(err, err_size, e.what());
    } catch (...) {
        return fail(err, err_size, "unknown C++ exception");
    }
}

extern "C" int32_t llamabind_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur, char * err,
                                           size_t err_size) {
    if (cur == nullptr || cur->size == 0) {
        return fail(err, err_size, "no candidates");
    }
    try {
        llama_sampler_apply(smpl, cur);
        return 0;
    } catch (const std::exception & e) {
        return fail(err, err_size, e.what());
    } catch (...) {
        return fail(err, err_size, "unknown C++ exception");
    }
}

namespace {

// The candidates for output row idx, in this thread's buffer; false (err set) without logits.
bool fill(llama_context * ctx, int32_t idx, std::vector<llama_token_data> & cur, char * err, size_t err_size) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == nullptr) {
        fail(err, err_size, "no logits at this output row");
        return false;
    }
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
    cur.resize(n_vocab);
    for (int32_t i = 0; i < n_vocab; i++) {
        cur[i] = llama_token_data{i, logits[i], 0.0f};
    }
    return true;
}

// The token the samplers selected in arr, checked; LLAMA_TOKEN_NULL (err set) when there is none.
llama_token selected(const llama_token_data_array & arr, size_t n_vocab, char * err, size_t err_size) {
    if (arr.selected < 0 || arr.selected >= (int64_t) arr.size) {
        fail(err, err_size, "the sampler selected no token (end a chain with greedy, dist or mirostat)");
        return LLAMA_TOKEN_NULL;
    }
    const llama_token token = arr.data[arr.selected].id;
    if (token < 0 || (size_t) token >= n_vocab) {
        fail(err, err_size, "the sampler selected a token id outside the vocabulary");
        return LLAMA_TOKEN_NULL;
    }
    return token;
}

// Members first..n-1 of a chain over arr (what llama_sampler_chain_apply does for all of them).
void apply_members(llama_sampler * chain, int32_t first, llama_token_data_array & arr) {
    const int32_t n = llama_sampler_chain_n(chain);
    for (int32_t i = first; i < n; i++) {
        llama_sampler_apply(llama_sampler_chain_get(chain, i), &arr);
    }
}

}  // namespace

extern "C" llama_token llamabind_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx, char * err,
                                                size_t err_size) {
    thread_local std::vector<llama_token_data> cur;
    if (!fill(ctx, idx, cur, err, err_size)) {
        return LLAMA_TOKEN_NULL;
    }
    llama_token_data_array arr = {cur.data(), cur.size(), -1, false};
    if (llamabind_sampler_apply(smpl, &arr, err, err_size) != 0) {
        return LLAMA_TOKEN_NULL;
    }
    const llama_token token = selected(arr, cur.size(), err, err_size);
    if (token == LLAMA_TOKEN_NULL || llamabind_sampler_accept(smpl, token, err, err_size) != 0) {
        return LLAMA_TOKEN_NULL;
    }
    return token;
}

extern "C" llama_token llamabind_sampler_sample_checked(llama_sampler * chain, llama_context * ctx, int32_t idx,
                                                        char * err, size_t err_size) {
    thread_local std::vector<llama_token_data> cur;
    if (!fill(ctx, idx, cur, err, err_size)) {
        return LLAMA_TOKEN_NULL;
    }
    llama_sampler * grammar = llama_sampler_chain_get(chain, 0);
    llama_token token = LLAMA_TOKEN_NULL;
    try {
        llama_token_data_array arr = {cur.data(), cur.size(), -1, false};
        apply_members(chain, 1, arr);
        token = selected(arr, cur.size(), err, err_size);
        if (token == LLAMA_TOKEN_NULL) {
            return LLAMA_TOKEN_NULL;
        }
        llama_token_data one = {token, 1.0f, 0.0f};
        llama_token_data_array check = {&one, 1, -1, false};
        llama_sampler_apply(grammar, &check);
        if (one.logit == -INFINITY) {  // rejected: the grammar over every candidate, then the rest again
            fill(ctx, idx, cur, err, err_size);
            arr = {cur.data(), cur.size(), -1, false};
            llama_sampler_apply(grammar, &arr);
            apply_members(chain, 1, arr);
            token = selected(arr, cur.size(), err, err_size);
            if (token == LLAMA_TOKEN_NULL) {
                return LLAMA_TOKEN_NULL;
            }
        }
    } catch (const std::exception & e) {
        fail(err, err_size, e.what());
        return LLAMA_TOKEN_NULL;
    } catch (...) {
        fail(err, err_size, "unknown C++ exception");
        return LLAMA_TOKEN_NULL;
    }
    if (llamabind_sampler_accept(chain, token, err, err_size) != 0) {
        return LLAMA_TOKEN_NULL;
    }
    return token;
}

extern "C" llama_sampler * llamabind_sampler_init_grammar(const llama_vocab * vocab, const char * grammar,
                                                          const char * root, bool lazy,
                                                          const char ** trigger_patterns, size_t n_trigger_patterns,
                                                          const llama_token * trigger_tokens,
                                                          size_t n_trigger_tokens, char * err, size_t err_size) {
    try {
        llama_sampler * s = lazy ? llama_sampler_init_grammar_lazy_patterns(vocab, grammar, root, trigger_patterns,
                                                                            n_trigger_patterns, trigger_tokens,
                                                                            n_trigger_tokens)
                                 : llama_sampler_init_grammar(vocab, grammar, root);
        if (s == nullptr) {
            fail(err, err_size, "the grammar does not parse (see the llamabind log)");
        }
        return s;
    } catch (const std::exception & e) {
        fail(err, err_size, e.what());
    } catch (...) {
        fail(err, err_size, "unknown C++ exception");
    }
    return nullptr;
}
