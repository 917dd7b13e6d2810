// llamabind's chat shim, parsing half (see llamabind_chat.h): model output into an assistant
// message, whole or streamed as deltas (llama-server's update_chat_msg), and JSON schema to grammar.
#include "llamabind_chat_common.hpp"

#include "json-schema-to-grammar.h"

#include <random>

using namespace llamabind_chat;

namespace {

std::string gen_tool_call_id() {
    static const char chars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    thread_local std::mt19937 rng{std::random_device{}()};
    std::uniform_int_distribution<size_t> pick(0, sizeof(chars) - 2);
    std::string id;
    for (int i = 0; i < 32; i++) {
        id += chars[pick(rng)];
    }
    return id;
}

json diff_json(const common_chat_msg_diff & d) {
    if (d.tool_call_index != std::string::npos) {
        return json::object({{"index", d.tool_call_index},
                             {"id", d.tool_call_delta.id},
                             {"name", d.tool_call_delta.name},
                             {"arguments", d.tool_call_delta.arguments}});
    }
    if (!d.reasoning_content_delta.empty()) {
        return json::object({{"reasoning_content", d.reasoning_content_delta}});
    }
    return json::object({{"content", d.content_delta}});
}

// A final output that does not fit the format keeps what its partial parse found (what the
// stream showed), else becomes content: a response is not lost to a parse error.
common_chat_msg parse(const llamabind_chat_parser & p, const std::string & text, bool is_partial) {
    common_chat_msg msg;
    try {
        msg = common_chat_parse(text, is_partial, p.params);
    } catch (const std::exception &) {
        if (is_partial) {
            throw;
        }
        try {
            msg = common_chat_parse(text, true, p.params);
        } catch (const std::exception &) {
            msg = common_chat_msg();
        }
        if (msg.empty()) {
            msg.content = text;
        }
    }
    msg.role = "assistant";
    return msg;
}

}  // namespace

extern "C" llamabind_chat_parser * llamabind_chat_parser_init(const char * params, char * err, size_t err_size) {
    quiet();
    return guarded(err, err_size, [&]() -> llamabind_chat_parser * {
        json o = json::parse(params);
        auto p = std::make_unique<llamabind_chat_parser>();
        p->params.format            = static_cast<common_chat_format>(jv(o, "format", 0));
        p->params.generation_prompt = jv(o, "generation_prompt", std::string());
        p->params.reasoning_format  = common_reasoning_format_from_name(jv(o, "reasoning_format", std::string("none")));
        p->params.reasoning_in_content =
            jv(o, "stream", false) && p->params.reasoning_format == COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY;
        p->params.parse_tool_calls = jv(o, "parse_tool_calls", false);
        p->params.is_continuation  = jv(o, "is_continuation", false);
        p->params.echo             = jv(o, "echo", false);
        const std::string arena    = jv(o, "parser", std::string());
        if (!arena.empty()) {
            p->params.parser.load(arena);
        }
        // Without a parser definition the output is content, untouched: streamed deltas are the text.
        p->content_only = arena.empty() && p->params.generation_prompt.empty();
        if (p->params.is_continuation && !p->params.echo) {
            p->msg = parse(*p, "", true);  // no delta for the assistant prefill
        }
        return p.release();
    });
}

extern "C" void llamabind_chat_parser_free(llamabind_chat_parser * parser) {
    delete parser;
}

extern "C" char * llamabind_chat_parse(const llamabind_chat_parser * parser, const char * text, size_t len,
                                       bool is_partial, char * err, size_t err_size) {
    return guarded(err, err_size, [&]() -> char * {
        return dup(parse(*parser, std::string(text, len), is_partial).to_json_oaicompat().dump());
    });
}

extern "C" char * llamabind_chat_parser_feed(llamabind_chat_parser * parser, const char * text, size_t len,
                                             bool is_partial, char * err, size_t err_size) {
    return guarded(err, err_size, [&]() -> char * {
        parser->text.append(text, len);
        json diffs = json::array();
        if (parser->content_only && is_partial) {
            if (len > 0) {
                parser->msg.role = "assistant";
                parser->msg.content.append(text, len);
                diffs.push_back(json::object({{"content", std::string(text, len)}}));
            }
            return dup(diffs.dump());
        }
        common_chat_msg next;
        std::vector<common_chat_msg_diff> changes;
        try {
            next = parse(*parser, parser->text, is_partial);
            if (next.empty() && is_partial) {
                return dup(diffs.dump());
            }
            next.set_tool_call_ids(parser->ids, gen_tool_call_id);
            changes = common_chat_msg_diff::compute_diffs(parser->msg, next);
        } catch (const std::exception &) {
            if (!is_partial) {
                throw;
            }
            return dup(diffs.dump());  // mid-stream text the parser cannot place yet: wait for more
        }
        for (const auto & d : changes) {
            diffs.push_back(diff_json(d));
        }
        parser->msg = std::move(next);
        return dup(diffs.dump());
    });
}

extern "C" char * llamabind_chat_parser_message(const llamabind_chat_parser * parser, char * err, size_t err_size) {
    return guarded(err, err_size, [&]() -> char * {
        common_chat_msg msg = parser->msg;
        msg.role            = "assistant";
        return dup(msg.to_json_oaicompat().dump());
    });
}

extern "C" char * llamabind_json_schema_to_grammar(const char * schema, char * err, size_t err_size) {
    quiet();
    return guarded(err, err_size, [&]() -> char * { return dup(json_schema_to_grammar(json::parse(schema))); });
}
