/* llamabind's chat shim: llama.cpp's chat layer (common/chat.h: Jinja templates, tool calls,
   reasoning, output parsing, JSON schema to grammar) behind a C interface. Everything crosses
   as JSON text; nothing thrown in C++ crosses into C. A function that fails returns NULL (or -1)
   and writes the reason into err (NUL-terminated, at most err_size bytes). Strings returned are
   the caller's: free them with llamabind_chat_string_free. */
#pragma once

#include "llamabind_shim.h"

#ifdef __cplusplus
extern "C" {
#endif

struct llamabind_chat_templates;
struct llamabind_chat_parser;

LLAMABIND_SHIM_API void llamabind_chat_string_free(char * s);

/* The model's templates (its default and its "tool_use" variant), or template_src when it is
   not NULL or empty. BOS/EOS come from the model's vocabulary. */
LLAMABIND_SHIM_API struct llamabind_chat_templates * llamabind_chat_templates_init(
    const struct llama_model * model, const char * template_src, char * err, size_t err_size);

LLAMABIND_SHIM_API void llamabind_chat_templates_free(struct llamabind_chat_templates * tmpls);

/* {"source", "tool_use_source", "explicit", "caps": {...}, "supports_enable_thinking"}. */
LLAMABIND_SHIM_API char * llamabind_chat_templates_info(const struct llamabind_chat_templates * tmpls,
                                                        char * err, size_t err_size);

/* Render an OpenAI chat request body as llama-server does (its oaicompat_chat_params_parse),
   with the server-side defaults in options: {"reasoning_format", "enable_thinking",
   "prefill_assistant", "chat_template_kwargs", "media_marker", "allow_media", "now"}.
   Returns {"prompt", "format", "grammar", "grammar_lazy", "grammar_triggers", "preserved_tokens",
   "stop", "generation_prompt", "parser", "parse_tool_calls", "reasoning_format", "media", ...}. */
LLAMABIND_SHIM_API char * llamabind_chat_apply(const struct llamabind_chat_templates * tmpls, const char * body,
                                               const char * options, char * err, size_t err_size);

/* A parser of model output for one response, from what llamabind_chat_apply returned
   ("format", "generation_prompt", "parser", "reasoning_format", "parse_tool_calls",
   "is_continuation", "echo", "stream"). */
LLAMABIND_SHIM_API struct llamabind_chat_parser * llamabind_chat_parser_init(const char * params, char * err,
                                                                           size_t err_size);

LLAMABIND_SHIM_API void llamabind_chat_parser_free(struct llamabind_chat_parser * parser);

/* Parse text (len bytes) as a whole: the assistant message as OpenAI JSON. Output that does not
   parse becomes content, as llama-server does it. */
LLAMABIND_SHIM_API char * llamabind_chat_parse(const struct llamabind_chat_parser * parser, const char * text,
                                               size_t len, bool is_partial, char * err, size_t err_size);

/* Streaming: append text to what the parser has seen, parse, and return the deltas since the
   last call, as a JSON list of {"content"}, {"reasoning_content"} or {"index", "id", "name",
   "arguments"} objects. With is_partial false this is the end: the final message is then
   available from llamabind_chat_parser_message. */
LLAMABIND_SHIM_API char * llamabind_chat_parser_feed(struct llamabind_chat_parser * parser, const char * text,
                                                     size_t len, bool is_partial, char * err, size_t err_size);

/* How many feeds re-parsed everything fed so far. The others appended their text to the open
   content or reasoning at the end of the last parse, which is proved to give the same message
   (llamabind_chat_parse.cpp): streaming costs the new text, not the whole output. */
LLAMABIND_SHIM_API size_t llamabind_chat_parser_reparses(const struct llamabind_chat_parser * parser);

/* The message parsed so far, as OpenAI JSON. */
LLAMABIND_SHIM_API char * llamabind_chat_parser_message(const struct llamabind_chat_parser * parser, char * err,
                                                        size_t err_size);

/* llama.cpp's json-schema-to-grammar: a GBNF grammar for a JSON schema given as text. */
LLAMABIND_SHIM_API char * llamabind_json_schema_to_grammar(const char * schema, char * err, size_t err_size);

#ifdef __cplusplus
}
#endif
