/* llama.cpp's common_fit_params behind C: fit the offloaded layers and the context size of a
   model to the free memory of its devices, as llama-server does by default (common/fit.h). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#if defined(_WIN32) && defined(LLAMABIND_SHIM_BUILD)
#    define LLAMABIND_FIT_API __declspec(dllexport)
#elif defined(_WIN32)
#    define LLAMABIND_FIT_API __declspec(dllimport)
#else
#    define LLAMABIND_FIT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* One device's memory in bytes: free and total before the fit, and what the model, its context
   and the compute buffers are projected to use there with the parameters chosen. */
struct llamabind_fit_device {
    char    name[64];
    char    description[128];
    int64_t free;
    int64_t total;
    int64_t model;
    int64_t context;
    int64_t compute;
};

/* common_fit_params on mparams and cparams, in place: n_gpu_layers where it is llama's default
   (-1) and n_ctx where it is 0; margin bytes stay free on each device; the context is not made
   smaller than n_ctx_min. mparams may then point into tensor_split (llama_max_devices() floats)
   and overrides (llama_max_tensor_buft_overrides() entries): both must outlive the model load.
   Up to n_max devices are described in devices (the host last), their count in *n_devices.
   Returns 0 (fits), 1 (cannot fit: the parameters as far as the fit got), 2 (an error, such as
   an unreadable model) or -1 (an exception). Prints nothing: common's log is silenced meanwhile,
   llama.cpp's goes to the callback set with llama_log_set, below errors as debug lines. */
LLAMABIND_FIT_API int32_t llamabind_fit_params(const char * path_model, struct llama_model_params * mparams,
                                               struct llama_context_params * cparams, size_t margin,
                                               uint32_t n_ctx_min, float * tensor_split,
                                               struct llama_model_tensor_buft_override * overrides,
                                               struct llamabind_fit_device * devices, int32_t n_max,
                                               int32_t * n_devices);

#ifdef __cplusplus
}
#endif
