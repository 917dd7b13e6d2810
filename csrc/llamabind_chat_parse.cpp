// llamabind's chat shim, parsing half (see llamabind_chat.h): model output into an assistant
// message, whole or streamed as deltas (llama-server's update_chat_msg), and JSON schema to grammar.
#include "llamabind_chat_common.hpp"

#include "json-schema-to-grammar.h"
#include "unicode.h"

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

// common_chat_peg_parse (chat.cpp), step for step, keeping the AST so that the open end of a
// streamed parse can be found; the mapper is llama.cpp's own.
struct parsed {
    common_chat_msg     msg;
    llamabind_chat_tail tail = LLAMABIND_TAIL_NONE;
};

llamabind_chat_tail open_tail(const llamabind_chat_parser & p, const common_peg_ast_arena & ast,
                              const common_peg_parse_result & result, size_t size);

parsed peg_parse(const llamabind_chat_parser & p, const std::string & input, bool is_partial) {
    const std::string        effective = p.params.generation_prompt + input;
    common_peg_parse_context ctx(effective, COMMON_PEG_PARSE_FLAG_LENIENT);
    const auto               result = p.arena().parse(ctx);
    if (result.fail() && !(is_partial && result.end > 0)) {
        throw std::runtime_error(std::string("The model produced output that does not match the expected ") +
                                 common_chat_format_name(p.params.format) + " format");
    }
    parsed out;
    out.msg.role = "assistant";
    std::unique_ptr<common_chat_peg_mapper> mapper;
    if (p.params.format == COMMON_CHAT_FORMAT_PEG_GEMMA4) {
        mapper = std::make_unique<common_chat_peg_gemma4_mapper>(out.msg);
    } else if (p.params.format == COMMON_CHAT_FORMAT_PEG_MINIMAX_M3) {
        mapper = std::make_unique<common_chat_peg_minimax_m3_mapper>(out.msg);
    } else {
        mapper = std::make_unique<common_chat_peg_mapper>(out.msg);
    }
    mapper->from_ast(ctx.ast, result);
    if (is_partial && result.need_more_input()) {
        out.tail = open_tail(p, ctx.ast, result, effective.size());
    }
    return out;
}

// A final output that does not fit the format keeps what its partial parse found (what the
// stream showed), else becomes content: a response is not lost to a parse error.
parsed parse(const llamabind_chat_parser & p, const std::string & text, bool is_partial) {
    parsed out;
    try {
        out = peg_parse(p, text, is_partial);
    } catch (const std::exception &) {
        if (is_partial) {
            throw;
        }
        try {
            out = peg_parse(p, text, true);
        } catch (const std::exception &) {
            out = parsed();
        }
        out.tail = LLAMABIND_TAIL_NONE;
        if (out.msg.empty()) {
            out.msg.content = text;
        }
    }
    out.msg.role = "assistant";
    return out;
}

// Streaming without re-parsing. When the parse ends in a content (or reasoning) node read by
// until() that ran into the end of the input, every parser above it answered need-more-input
// and none looked past it. Text appended there that starts none of until()'s delimiters makes
// until() run into the end again, so the parse is the same with that node longer: the message
// grows by the text itself. Only the plain mapper, whose content and reasoning are the nodes'
// text, is trusted with that; anything else is re-parsed.
std::unique_ptr<common_trie> tail_stops(const common_peg_arena & arena, const std::string & tag) {
    std::vector<std::string> delims;
    bool                     found = false;
    for (size_t id = 0; id < arena.size(); id++) {
        const auto * t = std::get_if<common_peg_tag_parser>(&arena.get(id));
        if (t == nullptr || t->tag != tag) {
            continue;
        }
        const common_peg_until_parser * until = nullptr;
        common_peg_parser_id            id_   = t->child;
        for (int depth = 0; depth < 8 && until == nullptr; depth++) {  // through named rules
            const auto & q = arena.get(id_);
            if (const auto * r = std::get_if<common_peg_rule_parser>(&q)) {
                id_ = r->child;
            } else if (const auto * ref = std::get_if<common_peg_ref_parser>(&q)) {
                id_ = arena.get_rule(ref->name);
            } else {
                until = std::get_if<common_peg_until_parser>(&q);
                break;
            }
        }
        if (until == nullptr) {
            return nullptr;  // a node of this tag may come from something other than until()
        }
        delims.insert(delims.end(), until->delimiters.begin(), until->delimiters.end());
        found = true;
    }
    return found ? std::make_unique<common_trie>(delims) : nullptr;
}

llamabind_chat_tail open_tail(const llamabind_chat_parser & p, const common_peg_ast_arena & ast,
                              const common_peg_parse_result & result, size_t size) {
    if (result.end != size || result.nodes.empty()) {
        return LLAMABIND_TAIL_NONE;
    }
    // The last node, and the content or reasoning node above it (below that: named rules only).
    llamabind_chat_tail         tail = LLAMABIND_TAIL_NONE;
    const common_peg_ast_node * last = &ast.get(result.nodes.back());
    for (;;) {
        if (last->tag == common_chat_peg_builder::CONTENT) {
            tail = LLAMABIND_TAIL_CONTENT;
        } else if (last->tag == common_chat_peg_builder::REASONING) {
            tail = LLAMABIND_TAIL_REASONING;
        } else if (!last->tag.empty()) {
            tail = LLAMABIND_TAIL_NONE;
        }
        if (last->children.empty()) {
            break;
        }
        last = &ast.get(last->children.back());
    }
    if (last->end != size || !last->is_partial || !last->invalid_utf8.empty()) {
        return LLAMABIND_TAIL_NONE;
    }
    return p.stops[tail] ? tail : LLAMABIND_TAIL_NONE;
}

// Whether text (appended at the open tail) can go straight into the message: whole UTF-8
// characters, no delimiter of the open node starting in it (not even one cut off at its end),
// and reasoning that is not whitespace only (the mapper drops such reasoning).
bool extends_tail(const llamabind_chat_parser & p, const std::string & text) {
    if (p.tail == LLAMABIND_TAIL_NONE || text.empty()) {
        return false;
    }
    if (p.tail == LLAMABIND_TAIL_REASONING &&
        p.msg.reasoning_content.find_first_not_of(" \n\r\t") == std::string::npos) {
        return false;
    }
    const common_trie & stops = *p.stops[p.tail];
    for (size_t pos = 0; pos < text.size();) {
        auto cp = common_parse_utf8_codepoint(text, pos);
        if (cp.status != utf8_parse_result::SUCCESS || stops.check_at(text, pos) != common_trie::NO_MATCH) {
            return false;
        }
        pos += cp.bytes_consumed;
    }
    return true;
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
        } else {
            p->pure_content = build_chat_peg_parser([](common_chat_peg_builder & b) { return b.content(b.rest()) + b.end(); });
        }
        // Without a parser definition the output is content, untouched: streamed deltas are the text.
        p->content_only = arena.empty() && p->params.generation_prompt.empty();
        if (p->params.format != COMMON_CHAT_FORMAT_PEG_GEMMA4 && p->params.format != COMMON_CHAT_FORMAT_PEG_MINIMAX_M3) {
            p->stops[LLAMABIND_TAIL_CONTENT]   = tail_stops(p->arena(), common_chat_peg_builder::CONTENT);
            p->stops[LLAMABIND_TAIL_REASONING] = tail_stops(p->arena(), common_chat_peg_builder::REASONING);
        }
        if (p->params.is_continuation && !p->params.echo) {
            auto first = parse(*p, "", true);  // no delta for the assistant prefill
            p->msg     = std::move(first.msg);
            p->tail    = first.tail;
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
        return dup(parse(*parser, std::string(text, len), is_partial).msg.to_json_oaicompat().dump());
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
        const std::string piece(text, len);
        if (is_partial && extends_tail(*parser, piece)) {
            (parser->tail == LLAMABIND_TAIL_CONTENT ? parser->msg.content : parser->msg.reasoning_content) += piece;
            diffs.push_back(json::object({{parser->tail == LLAMABIND_TAIL_CONTENT ? "content" : "reasoning_content", piece}}));
            return dup(diffs.dump());
        }
        parser->tail = LLAMABIND_TAIL_NONE;  // until a parse accounts for all the text again
        parser->n_reparsed++;
        parsed next;
        std::vector<common_chat_msg_diff> changes;
        try {
            next = parse(*parser, parser->text, is_partial);
            if (next.msg.empty() && is_partial) {
                return dup(diffs.dump());
            }
            next.msg.set_tool_call_ids(parser->ids, gen_tool_call_id);
            changes = common_chat_msg_diff::compute_diffs(parser->msg, next.msg);
        } catch (const std::exception &) {
            if (!is_partial) {
                throw;
            }
            return dup(diffs.dump());  // mid-stream text the parser cannot place yet: wait for more
        }
        for (const auto & d : changes) {
            diffs.push_back(diff_json(d));
        }
        parser->msg  = std::move(next.msg);
        parser->tail = next.tail;
        return dup(diffs.dump());
    });
}

extern "C" size_t llamabind_chat_parser_reparses(const llamabind_chat_parser * parser) {
    return parser->n_reparsed;
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
