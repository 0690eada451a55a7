;; keyfab policy module: pause provisioning when more than 2% of the devices
;; provisioned today failed programming (judged once 50 devices were provisioned today).
;; A new local day starts from zero. The WebAssembly text format: HQ assembles it when
;; policy.toml names a .wat file.
(module
  (import "keyfab" "input" (func $input (param i32) (result i64)))
  (import "keyfab" "deny_reason" (func $deny_reason (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "more than 2% of today's devices failed programming")

  (global $TODAY i32 (i32.const 4))          ;; devices allowed today
  (global $FAILED_TODAY i32 (i32.const 7))   ;; devices reported failed today

  (func (export "decide") (result i32)
    (local $today i64)
    (local $failed i64)
    (local.set $today (call $input (global.get $TODAY)))
    (local.set $failed (call $input (global.get $FAILED_TODAY)))
    ;; failed / today > 2%  <=>  failed * 50 > today
    (if (i32.and
          (i64.ge_u (local.get $today) (i64.const 50))
          (i64.gt_u (i64.mul (local.get $failed) (i64.const 50)) (local.get $today)))
      (then
        (drop (call $deny_reason (i32.const 0) (i32.const 50)))
        (return (i32.const 1))))
    (i32.const 0)))
