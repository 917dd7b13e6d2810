/* llamabind's C++ shim: llama.cpp calls that can throw a C++ exception through the C API, or
   assert on a state the caller cannot see, made safe. Each returns a status and writes
   llama.cpp's reason into err (a NUL-terminated string of at most err_size bytes). */
#pragma once

#include "llama.h"

#if defined(_WIN32) && defined(LLAMABIND_SHIM_BUILD)
#    define LLAMABIND_SHIM_API __declspec(dllexport)
#elif defined(_WIN32)
#    define LLAMABIND_SHIM_API __declspec(dllimport)
#else
#    define LLAMABIND_SHIM_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* llama_sampler_accept; 0 on success, -1 when llama.cpp threw (err says why). */
LLAMABIND_SHIM_API int32_t llamabind_sampler_accept(struct llama_sampler * smpl, llama_token token,
                                                    char * err, size_t err_size);

/* llama_sampler_apply over cur (size > 0); 0 on success, -1 when llama.cpp threw. */
LLAMABIND_SHIM_API int32_t llamabind_sampler_apply(struct llama_sampler * smpl, llama_token_data_array * cur,
                                                   char * err, size_t err_size);

/* llama_sampler_sample without its two aborts: no logits at row idx, or a sampler that selects
   no token (a chain without greedy/dist/mirostat, a Python sampler that only edits logits).
   Returns the token, or LLAMA_TOKEN_NULL with err set. */
LLAMABIND_SHIM_API llama_token llamabind_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx,
                                                        int32_t idx, char * err, size_t err_size);

/* llamabind_sampler_sample for a chain whose member 0 is a grammar, as llama-server samples: the
   rest of the chain picks a token over every candidate and the grammar only checks that one token;
   only when it rejects it is the grammar applied to every candidate and the rest run again. A
   grammar over a large vocabulary then costs one check per token instead of a pass over all of it.
   The token is accepted into the whole chain. */
LLAMABIND_SHIM_API llama_token llamabind_sampler_sample_checked(struct llama_sampler * chain, struct llama_context * ctx,
                                                                int32_t idx, char * err, size_t err_size);

/* llama_sampler_init_grammar_lazy_patterns (a plain grammar with no triggers when both counts
   are 0): NULL with err set when the grammar does not parse or a trigger pattern is not a
   valid regular expression (std::regex would throw). */
LLAMABIND_SHIM_API struct llama_sampler * llamabind_sampler_init_grammar(
    const struct llama_vocab * vocab, const char * grammar, const char * root, bool lazy,
    const char ** trigger_patterns, size_t n_trigger_patterns, const llama_token * trigger_tokens,
    size_t n_trigger_tokens, char * err, size_t err_size);

#ifdef __cplusplus
}
#endif
