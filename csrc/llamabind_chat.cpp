// llamabind's chat shim, rendering half (see llamabind_chat.h): templates and requests.
// llamabind_chat_apply follows llama-server's oaicompat_chat_params_parse (tools/server/server-common.cpp)
// step by step, so that a request renders here exactly as the server renders it.
#include "llamabind_chat_common.hpp"

#include <chrono>

using namespace llamabind_chat;

namespace {

// Image, audio and video parts become media markers, their sources listed in order (the
// server's oaicompat_content_load_media, without loading: the caller loads them).
void take_media(json & content, const json & options, json & media) {
    const bool allow = jv(options, "allow_media", false);
    const std::string marker = jv(options, "media_marker", std::string("<__media__>"));
    for (auto & p : content) {
        std::string type = jv(p, "type", std::string());
        std::string kind, url;
        if (type == "image_url") {
            kind = "image";
            url  = jv(jv(p, "image_url", json::object()), "url", std::string());
        } else if (type == "input_audio") {
            json a = jv(p, "input_audio", json::object());
            kind = "audio";
            url  = jv(a, "data", jv(a, "url", std::string()));
        } else if (type == "input_video" || type == "video_url") {
            json v = jv(p, type, json::object());
            kind = "video";
            url  = jv(v, "data", jv(v, "url", std::string()));
        } else if (type != "text") {
            throw std::invalid_argument("unsupported content[].type");
        } else {
            continue;
        }
        if (!allow) {
            throw std::invalid_argument(kind + " input is not supported without a multimodal projector");
        }
        media.push_back(json::object({{"type", kind}, {"url", url}}));
        p["type"] = "media_marker";
        p["text"] = marker;
        p.erase(type);
    }
}

json apply(const common_chat_templates * tmpls, json body, const json & options) {
    json out = json::object();
    auto tools       = jv(body, "tools", json());
    auto tool_choice = jv(body, "tool_choice", std::string("auto"));

    if (body.contains("stop") && body.at("stop").is_string()) {
        out["stop"] = json::array({body.at("stop").get<std::string>()});
    } else {
        out["stop"] = jv(body, "stop", json::array());
    }

    auto json_schema = jv(body, "json_schema", json());
    auto grammar     = jv(body, "grammar", std::string());
    if (!json_schema.is_null() && !grammar.empty()) {
        throw std::invalid_argument("Cannot use both json_schema and grammar");
    }
    if (body.contains("response_format")) {
        json response_format      = jv(body, "response_format", json::object());
        std::string response_type = jv(response_format, "type", std::string());
        if (response_type == "json_object") {
            if (response_format.contains("schema") || json_schema.empty()) {
                json_schema = jv(response_format, "schema", json::object());
            }
        } else if (response_type == "json_schema") {
            auto schema_wrapper = jv(response_format, "json_schema", json::object());
            json_schema         = jv(schema_wrapper, "schema", json::object());
        } else if (!response_type.empty() && response_type != "text") {
            throw std::invalid_argument(
                "response_format type must be one of \"text\", \"json_object\" or \"json_schema\", but got: " +
                response_type);
        }
    }
    if (json_schema.is_object() && json_schema.empty()) {
        json_schema["type"] = "object";  // an absent or empty schema means any object
    }

    if (!body.contains("messages")) {
        throw std::invalid_argument("'messages' is required");
    }
    json & messages = body.at("messages");
    if (!messages.is_array()) {
        throw std::invalid_argument("Expected 'messages' to be an array");
    }
    json media = json::array();
    for (auto & msg : messages) {
        if (!msg.is_object()) {
            throw std::invalid_argument("Expected each message to be an object");
        }
        std::string role = jv(msg, "role", std::string());
        if (role != "assistant" && !msg.contains("content")) {
            throw std::invalid_argument("All non-assistant messages must contain 'content'");
        }
        if (role == "assistant") {
            if (!msg.contains("content") && !msg.contains("tool_calls")) {
                throw std::invalid_argument("Assistant message must contain either 'content' or 'tool_calls'!");
            }
            if (!msg.contains("content")) {
                continue;
            }
        }
        json & content = msg.at("content");
        if (content.is_string() || content.is_null()) {
            continue;
        }
        if (!content.is_array()) {
            throw std::invalid_argument("Expected 'content' to be a string or an array");
        }
        take_media(content, options, media);
    }

    auto caps = common_chat_templates_get_caps(tmpls);
    common_chat_templates_inputs inputs;
    inputs.messages               = common_chat_msgs_parse_oaicompat(messages);
    inputs.tools                  = common_chat_tools_parse_oaicompat(tools);
    inputs.tool_choice            = common_chat_tool_choice_parse_oaicompat(tool_choice);
    inputs.json_schema            = json_schema.is_null() ? "" : json_schema.dump();
    inputs.grammar                = grammar;
    inputs.use_jinja              = true;
    inputs.parallel_tool_calls    = jv(body, "parallel_tool_calls", caps["supports_parallel_tool_calls"]);
    inputs.add_generation_prompt  = jv(body, "add_generation_prompt", true);
    inputs.continue_final_message = body.contains("continue_final_message") ?
                                        common_chat_continuation_parse(body.at("continue_final_message")) :
                                        COMMON_CHAT_CONTINUATION_NONE;
    if (inputs.continue_final_message == COMMON_CHAT_CONTINUATION_NONE && jv(options, "prefill_assistant", true) &&
        !inputs.messages.empty() && inputs.messages.back().role == "assistant") {
        if (inputs.messages.size() >= 2 && inputs.messages[inputs.messages.size() - 2].role == "assistant") {
            throw std::invalid_argument("Cannot have 2 or more assistant messages at the end of the list.");
        }
        inputs.continue_final_message = COMMON_CHAT_CONTINUATION_AUTO;
        inputs.add_generation_prompt  = false;
    }
    if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE && inputs.add_generation_prompt) {
        throw std::invalid_argument("Cannot set both add_generation_prompt and continue_final_message to true.");
    }
    if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE && !inputs.messages.empty() &&
        inputs.messages.back().role == "assistant" && !inputs.messages.back().tool_calls.empty()) {
        throw std::invalid_argument("Cannot continue an assistant message that contains tool calls.");
    }
    inputs.reasoning_format = common_reasoning_format_from_name(jv(options, "reasoning_format", std::string("deepseek")));
    if (body.contains("reasoning_format")) {
        inputs.reasoning_format = common_reasoning_format_from_name(body.at("reasoning_format").get<std::string>());
    }
    inputs.enable_thinking = jv(options, "enable_thinking", common_chat_templates_support_enable_thinking(tmpls));
    bool parse_tool_calls  = false;
    if (!inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE) {
        if (body.contains("grammar")) {
            throw std::invalid_argument("Cannot use custom grammar constraints with tools.");
        }
        parse_tool_calls = true;
    }

    // the server's defaults first, then the request's (the views below need named objects)
    const json default_kwargs = jv(options, "chat_template_kwargs", json::object());
    const json request_kwargs = jv(body, "chat_template_kwargs", json::object());
    for (const json * kwargs : {&default_kwargs, &request_kwargs}) {
        if (!kwargs->is_object()) {
            throw std::invalid_argument("chat_template_kwargs must be an object");
        }
        for (const auto & item : kwargs->items()) {
            inputs.chat_template_kwargs[item.key()] = item.value().dump();
        }
    }
    auto it = inputs.chat_template_kwargs.find("enable_thinking");
    if (it != inputs.chat_template_kwargs.end()) {
        if (it->second == "true") {
            inputs.enable_thinking = true;
        } else if (it->second == "false") {
            inputs.enable_thinking = false;
        } else if (!it->second.empty() && it->second[0] == '"') {
            throw std::invalid_argument("invalid type for \"enable_thinking\" (expected boolean, got string)");
        }
    }
    if (body.contains("reasoning_effort")) {
        auto reasoning_effort = jv(body, "reasoning_effort", std::string(""));
        if (reasoning_effort == "none") {
            inputs.enable_thinking = false;
            inputs.chat_template_kwargs.erase("reasoning_effort");
        } else if (!reasoning_effort.empty()) {
            inputs.chat_template_kwargs["reasoning_effort"] = json(reasoning_effort).dump();
        }
    }
    if (options.contains("now")) {
        auto secs  = std::chrono::seconds(options.at("now").get<int64_t>());
        inputs.now = std::chrono::system_clock::time_point(secs);
    }

    auto params = common_chat_templates_apply(tmpls, inputs);

    out["prompt"]            = params.prompt;
    out["format"]            = static_cast<int>(params.format);
    out["format_name"]       = common_chat_format_name(params.format);
    out["grammar"]           = params.grammar;
    out["grammar_lazy"]      = params.grammar_lazy;
    out["generation_prompt"] = params.generation_prompt;
    out["parser"]            = params.parser;
    out["parse_tool_calls"]  = parse_tool_calls;
    out["reasoning_format"]  = common_reasoning_format_name(inputs.reasoning_format);
    out["enable_thinking"]   = inputs.enable_thinking;
    out["supports_thinking"] = params.supports_thinking;
    out["thinking_start_tag"] = params.thinking_start_tag;
    out["thinking_end_tags"] = params.thinking_end_tags;
    out["is_continuation"]   = inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE;
    out["preserved_tokens"]  = params.preserved_tokens;
    out["media"]             = media;
    json triggers            = json::array();
    for (const auto & t : params.grammar_triggers) {
        triggers.push_back(json::object({{"type", static_cast<int>(t.type)}, {"value", t.value}, {"token", t.token}}));
    }
    out["grammar_triggers"] = triggers;
    for (const auto & stop : params.additional_stops) {
        out["stop"].push_back(stop);
    }
    return out;
}

}  // namespace

extern "C" void llamabind_chat_string_free(char * s) {
    std::free(s);
}

extern "C" llamabind_chat_templates * llamabind_chat_templates_init(const llama_model * model, const char * template_src,
                                                                    char * err, size_t err_size) {
    quiet();
    const std::string src = template_src != nullptr ? template_src : "";
    if (model == nullptr) {
        set_err(err, err_size, "a model is required (for its vocabulary's BOS and EOS)");
        return nullptr;
    }
    return guarded(err, err_size, [&]() -> llamabind_chat_templates * {
        auto * t = new llamabind_chat_templates{common_chat_templates_init(model, src)};
        return t;
    });
}

extern "C" void llamabind_chat_templates_free(llamabind_chat_templates * tmpls) {
    delete tmpls;
}

extern "C" char * llamabind_chat_templates_info(const llamabind_chat_templates * tmpls, char * err, size_t err_size) {
    return guarded(err, err_size, [&]() -> char * {
        const auto * t = tmpls->ptr.get();
        json caps      = json::object();
        for (const auto & [k, v] : common_chat_templates_get_caps(t)) {
            caps[k] = v;
        }
        json info = json::object({{"source", common_chat_templates_source(t)},
                                  {"tool_use_source", common_chat_templates_source(t, "tool_use")},
                                  {"explicit", common_chat_templates_was_explicit(t)},
                                  {"supports_enable_thinking", common_chat_templates_support_enable_thinking(t)}});
        info["caps"] = caps;
        return dup(info.dump());
    });
}

extern "C" char * llamabind_chat_apply(const llamabind_chat_templates * tmpls, const char * body, const char * options,
                                       char * err, size_t err_size) {
    return guarded(err, err_size, [&]() -> char * {
        json b = json::parse(body);
        json o = options != nullptr ? json::parse(options) : json::object();
        if (!b.is_object() || !o.is_object()) {
            throw std::invalid_argument("the request body and options must be JSON objects");
        }
        return dup(apply(tmpls->ptr.get(), std::move(b), o).dump());
    });
}

