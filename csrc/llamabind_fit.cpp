// common_fit_params (llama.cpp's common/fit.h) behind C, for n_gpu_layers="auto" / n_ctx="auto".
#include "llamabind_fit.h"

#include "fit.h"
#include "log.h"

#include <cstring>
#include <mutex>
#include <vector>

namespace {

// common_fit_params swaps llama's global log callback while it measures: one fit at a time.
std::mutex fit_mutex;

// common's own log (the fit's trace lines, a memory table) is printed by common_log's thread to
// stdout/stderr; a library prints nothing, so it is silenced for the call and restored after.
struct quiet_common_log {
    int thold = common_log_get_verbosity_thold();
    quiet_common_log() { common_log_set_verbosity_thold(-1); }
    ~quiet_common_log() { common_log_set_verbosity_thold(thold); }
};

void copy(char * dst, size_t size, const char * src) {
    std::strncpy(dst, src ? src : "", size - 1);
    dst[size - 1] = '\0';
}

}  // namespace

extern "C" int32_t llamabind_fit_params(const char * path_model, llama_model_params * mparams,
                                        llama_context_params * cparams, size_t margin, uint32_t n_ctx_min,
                                        float * tensor_split, llama_model_tensor_buft_override * overrides,
                                        llamabind_fit_device * devices, int32_t n_max, int32_t * n_devices) {
    std::lock_guard<std::mutex> lock(fit_mutex);
    quiet_common_log quiet;
    *n_devices = 0;
    try {
        std::vector<size_t> margins(llama_max_devices(), margin);
        const common_params_fit_status status = common_fit_params(
            path_model, mparams, cparams, tensor_split, overrides, margins.data(), n_ctx_min, nullptr,
            GGML_LOG_LEVEL_ERROR);
        if (status == COMMON_PARAMS_FIT_STATUS_ERROR) {
            return 2;
        }
        // what the chosen parameters are projected to use, device by device (the host last)
        std::vector<ggml_backend_dev_t> devs;
        uint32_t n_layer = 0, n_ctx_train = 0, n_expert = 0;
        const common_device_memory_data_vec mem = common_get_device_memory_data(
            path_model, mparams, cparams, devs, n_layer, n_ctx_train, n_expert, GGML_LOG_LEVEL_ERROR);
        for (size_t i = 0; i < mem.size() && int32_t(i) < n_max; i++) {
            llamabind_fit_device & d = devices[i];
            const bool host = i >= devs.size();
            copy(d.name, sizeof d.name, host ? "host" : ggml_backend_dev_name(devs[i]));
            copy(d.description, sizeof d.description, host ? "system memory" : ggml_backend_dev_description(devs[i]));
            d.free = mem[i].free;
            d.total = mem[i].total;
            d.model = int64_t(mem[i].model);
            d.context = int64_t(mem[i].context);
            d.compute = int64_t(mem[i].compute);
            *n_devices = int32_t(i + 1);
        }
        return status == COMMON_PARAMS_FIT_STATUS_SUCCESS ? 0 : 1;
    } catch (...) {
        return -1;
    }
}
