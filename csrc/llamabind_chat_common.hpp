// What both halves of the chat shim share (llamabind_chat.cpp, llamabind_chat_parse.cpp): the
// handles, and the helpers that keep C++ exceptions and common/'s log on this side of the C API.
#pragma once

#define LLAMABIND_SHIM_BUILD
#include "llamabind_chat.h"

#include "chat.h"
#include "chat-peg-parser.h"
#include "log.h"
#include "trie.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using json = common_json;

struct llamabind_chat_templates {
    common_chat_templates_ptr ptr;
};

// Where streamed text goes without a re-parse: the open content or reasoning node at the end of
// the last parse (see llamabind_chat_parse.cpp), and the delimiters that would close it.
enum llamabind_chat_tail { LLAMABIND_TAIL_NONE, LLAMABIND_TAIL_CONTENT, LLAMABIND_TAIL_REASONING };

struct llamabind_chat_parser {
    common_chat_parser_params    params;
    common_peg_arena             pure_content;  // the parser llama.cpp uses when params.parser is empty
    std::string                  text;          // everything fed so far
    common_chat_msg              msg;           // its last parse
    std::vector<std::string>     ids;           // tool call ids, fixed once given
    bool                         content_only = false;
    llamabind_chat_tail          tail         = LLAMABIND_TAIL_NONE;
    std::unique_ptr<common_trie> stops[3];      // per tail kind: the delimiters that end it (null: no fast path)
    size_t                       n_reparsed   = 0;

    const common_peg_arena & arena() const { return params.parser.empty() ? pure_content : params.parser; }
};
namespace llamabind_chat {

inline void set_err(char * err, size_t err_size, const char * what) {
    if (err != nullptr && err_size > 0) {
        std::snprintf(err, err_size, "%s", what);
    }
}

inline char * dup(const std::string & s) {
    char * out = static_cast<char *>(std::malloc(s.size() + 1));
    if (out != nullptr) {
        std::memcpy(out, s.data(), s.size() + 1);
    }
    return out;
}

// Runs f, turning anything it throws into NULL and err.
template <typename F> auto guarded(char * err, size_t err_size, F && f) -> decltype(f()) {
    try {
        return f();
    } catch (const std::exception & e) {
        set_err(err, err_size, e.what());
    } catch (...) {
        set_err(err, err_size, "unknown C++ exception");
    }
    return nullptr;
}

// common/ logs through its own logger, to stderr: a library prints nothing unasked. Failures
// reach the caller as errors instead.
inline void quiet() {
    static std::once_flag once;
    std::call_once(once, [] { common_log_set_verbosity_thold(-1); });
}

// The server's json_value: the default for a missing, null or mistyped value.
template <typename T> T jv(const json & body, const std::string & key, const T & def) {
    if (body.contains(key) && !body.at(key).is_null()) {
        try {
            return body.at(key).get<T>();
        } catch (const common_json_error &) {
            return def;
        }
    }
    return def;
}

}  // namespace llamabind_chat
