"""Every line of reliability.md, and the tests (here and elsewhere in tests/) that build it.

Patterns are fnmatch patterns over pytest node ids. `kind` says how the summary counts a line:
"case" (a bad input or check), "load" (load held) or "fault" (fault survived).
"""
from __future__ import annotations

E = "tests/http/test_api_errors.py::"
R = "tests/http/test_api_routes.py::"
C = "tests/http/test_concurrency.py::"
S = "tests/http/test_security.py::"
G = "tests/test_malformed_gguf.py::"
T = "tests/test_chat_template.py::"
K = "tests/test_tokenizers.py::"
N = "tests/engine/test_engine.py::"
L = "tests/engine/test_lifecycle.py::"
RQ = "tests/reliability/test_requests.py::"
RF = "tests/reliability/test_faults.py::"
RL = "tests/reliability/test_load.py::"
RS = "tests/reliability/test_security.py::"
FZ = "tests/reliability/test_schema_fuzz.py::"

SANDBOX = [G + "test_chat_template_sandbox_escape_runs_nothing", T + "test_sandbox_escape_is_an_error_and_runs_nothing*"]

LINES: list[tuple[str, str, str, list[str]]] = [
    # (section, line, kind, patterns)
    ("Malformed GGUF files", "empty file; bad magic; version 1, 0, current+1; truncated at every byte", "case",
     [G + p for p in ("test_the_base_file_is_valid", "test_missing_file_is_model_not_found", "test_empty_file",
                      "test_directory_named_gguf", "test_bad_magic*", "test_unsupported_version*",
                      "test_big_endian_version_is_named", "test_truncated_*")]),
    ("Malformed GGUF files", "tensor count or KV count = 2^64-1, or larger than the bytes left", "case",
     [G + "test_tensor_count_larger_than_the_file*", G + "test_kv_count_*"]),
    ("Malformed GGUF files", "key/string length 2^64-1 or past the end; array length 2^63; nested arrays", "case",
     [G + "test_key_length_beyond_the_file*", G + "test_string_value_length_beyond_the_file*",
      G + "test_array_length_beyond_the_file*", G + "test_nested_array"]),
    ("Malformed GGUF files", "value type out of range; array of the wrong element type; duplicate keys", "case",
     [G + "test_value_type_out_of_range*", G + "test_array_element_type_out_of_range*", G + "test_duplicate_key",
      G + "test_metadata_of_the_wrong_type*", G + "test_vocabulary_text_that_is_not_utf8*",
      G + "test_block_count_beyond_the_tensors*"]),
    ("Malformed GGUF files", "general.alignment 0, 13, 2^31, or of the wrong type", "case",
     [G + "test_bad_alignment_value*", G + "test_alignment_of_the_wrong_type*", G + "test_custom_alignment_is_honoured"]),
    ("Malformed GGUF files", "tensor name of 64+ bytes; duplicate tensor names", "case",
     [G + "test_tensor_name_of_6*", G + "test_duplicate_tensor_names"]),
    ("Malformed GGUF files", "n_dims 0, 5, 2^32-1; dimensions 0, -1, 2^63; products overflowing 64 bits", "case",
     [G + "test_bad_number_of_dimensions*", G + "test_bad_dimension*", G + "test_dimensions_whose_product_*"]),
    ("Malformed GGUF files", "tensor type out of range or negative; row length not a multiple of the block", "case",
     [G + "test_tensor_type_out_of_range*", G + "test_row_length_not_a_multiple_of_the_block"]),
    ("Malformed GGUF files", "tensor offset unaligned, 2^64-1, or past the end; overlapping tensors", "case",
     [G + "test_bad_tensor_offset*", G + "test_tensor_data_past_the_end_of_the_file", G + "test_overlapping_tensors"]),
    ("Malformed GGUF files", "a tensor the architecture needs is missing or has the wrong shape", "case",
     [G + "test_missing_required_tensor*", G + "test_required_tensor_with_the_wrong_shape",
      G + "test_embedding_rows_differ_from_the_vocabulary"]),
    ("Malformed GGUF files", "vocabulary arrays of different lengths, bad byte tokens, special ids past the end",
     "case", [G + "test_vocabulary_arrays_of_different_lengths*", G + "test_malformed_byte_token*",
              G + "test_special_token_id_beyond_the_vocabulary*", G + "test_bpe_vocabulary_without_merges",
              G + "test_empty_vocabulary", G + "test_invalid_utf8_in_names_does_not_escape"]),
    ("Malformed GGUF files", "a chat template that tries to escape the Jinja sandbox", "case", SANDBOX),
    ("Malformed GGUF files", "property test: flipped, truncated and spliced bytes of a valid tiny GGUF", "case",
     [G + "test_mutated_files_load_cleanly_or_raise_a_woolly_error*"]),

    ("Requests", "prompt longer than the context: a 400 that says so", "case",
     [E + "test_prompt_longer_than_the_context", E + "test_max_tokens_beyond_the_context",
      RQ + "test_prompt_of_token_ids_longer_than_the_context"]),
    ("Requests", "max_tokens, n, top_k, logprobs, temperature, seed out of range: 400 INVALID_REQUEST", "case",
     [E + "test_bad_sampling_parameter*", E + "test_non_finite_temperature*", E + "test_openai_routes_bad_parameters*",
      N + "test_invalid_options_raise_invalid_request*"]),
    ("Requests", "token ids out of range or negative in detokenize / prompts: 400", "case",
     [E + "test_detokenize_ids_out_of_range*", RQ + "test_ids_at_the_vocabulary_edge",
      RQ + "test_prompt_token_ids_out_of_range_are_a_400*"]),
    ("Requests", "invalid UTF-8, lone surrogates, split characters: streamed text always valid UTF-8", "case",
     [E + "test_malformed_body*", RQ + "test_invalid_unicode_in_any_text_field_is_a_400*",
      RQ + "test_an_escaped_surrogate_pair_is_one_valid_character",
      RQ + "test_streamed_bytes_are_always_valid_utf8_even_at_high_temperature",
      R + "test_streamed_tokens_are_whole_characters", N + "test_streamed_pieces_are_whole_characters"]),
    ("Requests", "special-token text in user content is tokenized as plain text", "case",
     [RQ + "test_tokenize_keeps_special_token_text_plain_unless_asked", RQ + "test_a_text_prompt_is_tokenized*",
      RQ + "test_chat_content_with_special_token_text_stays_plain*", R + "test_special_token_text_is_plain_text*",
      T + "test_control_tokens_come_only_from_the_template*", K + "test_user_text_with_control_tokens_stays_text*"]),
    ("Requests", "a request-supplied chat template is refused", "case",
     [E + "test_request_supplied_chat_template_is_refused*", RQ + "test_any_request_chat_template_value_is_refused*",
      RQ + "test_ollamas_template_field_is_refused_too*"]),
    ("Requests", "bodies over the size limit: 413; too many headers: rejected", "case",
     [E + "test_body_over_the_limit", E + "test_chunked_body_over_the_limit",
      RQ + "test_too_many_or_too_large_headers_are_rejected*"]),
    ("Requests", "model names with ../, absolute paths, odd characters: 400, nothing opened", "case",
     [E + "test_path_like_model_names*", E + "test_path_like_model_field*", E + "test_load_unknown_model",
      RQ + "test_odd_model_names_are_a_400_on_every_route*"]),
    ("Requests", "(issue 8) schemathesis over /schema/openapi.json: no 5xx, no answer off the schema", "case",
     [FZ + "*"]),

    ("Faults and load", "a disconnect mid-stream or a WebSocket cancel stops within a step and frees the slot",
     "fault", [C + "test_disconnect_mid_stream_frees_the_slot", C + "test_websocket_closed_mid_generation_frees*",
               "tests/http/test_websocket.py::test_cancel_stops_the_generation",
               N + "test_cancel_from_the_stream_consumer_takes_effect_within_one_step"]),
    ("Faults and load", "100 requests cancelled 10 ms in, then 100 that all succeed; nothing left behind", "fault",
     [RF + "test_100_requests_cancelled_10ms_in_then_100_that_all_succeed",
      C + "test_many_early_cancels_leave_nothing_behind"]),
    ("Faults and load", "(issue 8) a model unloaded while requests run ends them clearly; the server stays up",
     "fault", [RF + "test_unload_while_requests_run*", L + "test_unload_while_generating*"]),
    ("Faults and load", "(issue 8) a failed load leaves the previous state usable", "fault",
     [RF + "test_a_failed_load_leaves_the_loaded_model_serving", L + "test_a_failed_load*",
      S + "test_loading_a_broken_model_fails_and_keeps_the_loaded_one"]),
    ("Faults and load", "(slots + 1) concurrent streams for several rounds, each with its solo text", "load",
     [RL + "test_slots_plus_one_streams_for_three_rounds_each_as_alone",
      N + "test_same_seed_same_text_alone_and_in_a_batch_of_four", N + "test_eight_sessions_progress_together*",
      N + "test_requests_beyond_the_slots_queue_and_complete", C + "test_eight_streams_all_receive_tokens*"]),
    ("Faults and load", "more clients than the queue holds: a clear busy error, no reset connection", "load",
     [RL + "test_more_clients_than_the_queue_admits_get_503_and_no_reset",
      C + "test_full_queue_answers_busy_and_the_queued_still_complete"]),
    ("Faults and load", "memory stays flat over thousands of requests (RssAnon)", "load",
     [RL + "test_memory_is_flat_over_2000_requests_after_warm_up"]),
    ("Faults and load", "stream output equals non-stream output for the same seed", "case",
     [R + "test_generate_stream_matches_json", R + "test_chat_stream_matches_json",
      "tests/http/test_openai_client.py::test_chat_stream_with_usage_matches_non_stream"]),
    ("Faults and load", "/health answers while a long generation runs", "load",
     [RL + "test_health_answers_quickly_while_every_slot_decodes_and_the_queue_is_full",
      C + "test_disconnect_mid_stream_frees_the_slot"]),

    ("Security", "bind 127.0.0.1 by default; 0.0.0.0 only when configured", "case",
     [RS + "test_the_server_binds_loopback_by_default", RS + "test_all_interfaces_only_when_configured"]),
    ("Security", "missing or wrong API key: 401 UNAUTHORIZED, compared in constant time; /health public", "case",
     [S + "test_missing_or_wrong_key_is_401*", S + "test_health_is_public", S + "test_every_configured_key_works",
      S + "test_websocket_needs_a_key", RS + "test_missing_or_wrong_key_is_401_and_never_reaches_the_app*",
      RS + "test_each_configured_key_passes_and_health_is_public*", RS + "test_keys_are_compared_with_hmac*",
      RS + "test_the_key_check_has_no_ordinary_comparison"]),
    ("Security", "rate limiting per key: 429 RATE_LIMITED with Retry-After", "case",
     [S + "test_rate_limit_per_key_with_retry_after"]),
    ("Security", "CORS: only the configured origins", "case",
     [S + "test_cors_for_the_configured_origin_only", S + "test_open_server_sends_no_cors_headers"]),
    ("Security", "error messages never leak file system paths", "case",
     [RS + "test_no_error_body_names_a_file_system_path", E + "test_load_unknown_model",
      S + "test_loading_a_broken_model_fails_and_keeps_the_loaded_one"]),
    ("Security", "(issue 8) the Jinja sandbox holds against the known escape payloads", "case", SANDBOX),

    ("Requests", "(issue 15) JSON nested past server.max_json_depth: 400 (WS: an error event, the socket lives)", "case",
     ["tests/http/test_protocol.py::test_deeply_nested_json_is_a_400", "tests/http/test_protocol.py::test_deeply_nested_ws_message_leaves_the_socket_and_its_request",
      "tests/http/test_protocol.py::test_invalid_json_says_so", "tests/http/test_protocol.py::test_missing_field_is_named_as_sent"]),
    ("Requests", "(issue 15) a prompt over the context is CONTEXT_LENGTH_EXCEEDED on every route", "case",
     ["tests/http/test_protocol.py::test_prompt_over_the_context_on_every_route*", "tests/http/test_protocol.py::test_prompt_over_the_context_over_websocket*"]),
    ("Requests", "(issue 15) accepted fields do something or are refused; seeds use 64 bits", "case",
     ["tests/http/test_protocol.py::test_ollama_options_are_honoured", "tests/http/test_protocol.py::test_unknown_ollama_option_is_refused_by_name",
      "tests/http/test_protocol.py::test_num_ctx_over_the_context_is_refused", "tests/http/test_protocol.py::test_openai_unbuilt_fields_are_refused",
      "tests/http/test_protocol.py::test_seeds_use_all_64_bits"]),
    ("Requests", "(issue 15) big prompts: tokenized off the event loop, capped by max_prompt_bytes", "case",
     ["tests/reliability/test_bounded_work.py::test_a_big_prompt_is_tokenized_off_the_event_loop", "tests/reliability/test_bounded_work.py::test_a_prompt_over_max_prompt_bytes_is_a_400_naming_it",
      "tests/reliability/test_bounded_work.py::test_websocket_big_prompts_are_bounded"]),
    ("Faults and load", "(issue 15) embeddings: a token cap, chunked passes, bounded memory", "load",
     ["tests/reliability/test_bounded_work.py::test_sixty_long_embedding_inputs_over_the_token_cap_are_a_400_in_bounded_memory",
      "tests/reliability/test_bounded_work.py::test_sixty_embedding_inputs_under_the_cap_run_in_chunks_in_bounded_memory"]),
    ("Faults and load", "(issue 15) slowloris: half-sent requests time out; a connection cap; a bounded log", "load",
     ["tests/http/test_hardening.py::test_half_sent_requests_are_closed_and_do_not_starve_the_server", "tests/http/test_hardening.py::test_a_body_must_keep_flowing",
      "tests/http/test_hardening.py::test_running_out_of_descriptors_does_not_flood_the_log"]),
    ("Faults and load", "(issue 15) a stream abandoned inside asyncio.run cancels only itself; a clean exit", "fault",
     ["tests/engine/test_abandoned_streams.py::*", L + "test_close_ends_requests_frees_the_model_and_is_idempotent"]),
    ("Faults and load", "(issue 15) the prefix cache's bound holds for the process after disconnect storms", "load",
     ["tests/reliability/test_memory_bound.py::*"]),
    ("Security", "(issue 15) hostile chat templates from model files: bounded worker, quick error", "case",
     ["tests/reliability/test_bounded_work.py::test_a_hostile_chat_template_is_a_quick_error_and_the_server_keeps_answering*"]),
    ("Security", "(issue 15) cross-site control: JSON bodies only, Host checked, foreign Origins refused", "case",
     ["tests/http/test_hardening.py::test_a_body_that_is_not_declared_json_is_415", "tests/http/test_hardening.py::test_dns_rebinding_host_is_refused_on_a_loopback_server",
      "tests/http/test_hardening.py::test_a_foreign_origin_cannot_open_the_websocket_or_post", "tests/http/test_hardening.py::test_loopback_names_and_allowed_hosts_pass"]),
    ("Security", "(issue 15) one rate-limit identity for HTTP, wrong keys and WebSocket messages", "case",
     ["tests/http/test_hardening.py::test_random_bearers_do_not_escape_the_limit_of_a_keyless_server",
      "tests/http/test_hardening.py::test_websocket_generations_count_against_the_same_limit", "tests/http/test_hardening.py::test_several_authorization_headers_are_400",
      "tests/http/test_hardening.py::test_wrong_keys_are_throttled_per_address_and_a_valid_key_keeps_its_budget"]),
    ("Requests", "(issue 15) the request's model on every route: loaded on demand, LRU within max_loaded, keep_alive, 404 naming the available ones", "case",
     ["tests/http/test_models.py::test_every_route_answers_with_the_requested_model", "tests/http/test_models.py::test_an_unknown_model_is_404_naming_the_available_ones*",
      "tests/http/test_models.py::test_an_unknown_model_on_the_websocket_is_an_error_event", "tests/http/test_models.py::test_the_least_recently_used_idle_model_is_evicted_at_max_loaded",
      "tests/http/test_models.py::test_max_loaded_one_evicts_the_idle_model_and_refuses_while_it_is_busy", "tests/http/test_models.py::test_concurrent_requests_for_an_unloaded_model_load_it_once",
      "tests/http/test_models.py::test_keep_alive_zero_unloads_after_the_request_and_the_default_reloads", "tests/http/test_models.py::test_a_bad_keep_alive_is_a_400*"]),
    ("Security", "(issue 15) a model path loads over HTTP only from the models directory", "case",
     ["tests/http/test_models.py::test_loading_a_path_only_from_the_models_directory"]),
    ("Malformed GGUF files", "(issue 15) a model path that is not a regular file (sysfs, FIFO, device): one clear error",
     "case", [G + "test_a_link_to_a_file_that_is_not_a_model_is_one_clear_error*",
              G + "test_a_fifo_is_refused_without_waiting_for_a_writer", G + "test_a_dangling_link_is_model_not_found"]),
]

SECTIONS = ["Malformed GGUF files", "Requests", "Faults and load", "Security"]

# What `make reliability` runs besides tests/reliability: the existing tests the lines above name.
EXISTING = [
    "tests/test_malformed_gguf.py",
    "tests/test_chat_template.py::test_sandbox_escape_is_an_error_and_runs_nothing",
    "tests/test_chat_template.py::test_control_tokens_come_only_from_the_template",
    "tests/test_tokenizers.py::test_user_text_with_control_tokens_stays_text_unless_asked",
    "tests/http/test_api_errors.py", "tests/http/test_security.py", "tests/http/test_concurrency.py",
    "tests/http/test_websocket.py::test_cancel_stops_the_generation",
    "tests/http/test_api_routes.py::test_generate_stream_matches_json",
    "tests/http/test_api_routes.py::test_chat_stream_matches_json",
    "tests/http/test_api_routes.py::test_streamed_tokens_are_whole_characters",
    "tests/http/test_api_routes.py::test_special_token_text_is_plain_text_unless_asked",
    "tests/http/test_openai_client.py::test_chat_stream_with_usage_matches_non_stream",
    "tests/engine/test_lifecycle.py",
    "tests/engine/test_abandoned_streams.py", "tests/http/test_protocol.py", "tests/http/test_hardening.py",
    "tests/engine/test_engine.py::test_cancel_from_the_stream_consumer_takes_effect_within_one_step",
    "tests/engine/test_engine.py::test_same_seed_same_text_alone_and_in_a_batch_of_four",
    "tests/engine/test_engine.py::test_eight_sessions_progress_together_and_match_their_solo_text",
    "tests/engine/test_engine.py::test_requests_beyond_the_slots_queue_and_complete",
    "tests/engine/test_engine.py::test_streamed_pieces_are_whole_characters",
    "tests/engine/test_engine.py::test_invalid_options_raise_invalid_request",
]

if __name__ == "__main__":   # the Makefile asks for the list of existing tests to run
    print(" ".join(EXISTING))
