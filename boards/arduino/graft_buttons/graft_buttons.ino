// graft kiosk: two buttons and an LED on an Arduino (Uno, Nano, Pro Micro...) driving
// `graft serve --serial /dev/ttyUSB0` (or /dev/serial0 on the Pi's UART) over its serial link.
//
//   LEARN button  (pin 2 to GND): learns 5 frames of the next class name, "obj1", "obj2", ...
//   CLASSIFY button (pin 3 to GND): classifies what the camera sees
//   LED (pin 13): on when the answer is the class in TARGET, blinks on "unknown", off otherwise
//
// Wiring: see boards/arduino/README.md. Protocol: docs/PROTOCOL.md (115200 8N1, one reply line
// per request, "OK ..." or "ERR <code> ...", lines starting with "EVT" are events).

const int LEARN_PIN = 2;
const int CLASSIFY_PIN = 3;
const int LED_PIN = 13;
const char *TARGET = "obj1";

int learned = 0;
char line[128];

void setup() {
  pinMode(LEARN_PIN, INPUT_PULLUP);
  pinMode(CLASSIFY_PIN, INPUT_PULLUP);
  pinMode(LED_PIN, OUTPUT);
  Serial.begin(115200);
}

// Reads one reply line (skipping EVT lines); false on timeout.
bool readReply(unsigned long timeoutMs) {
  unsigned long start = millis();
  size_t n = 0;
  while (millis() - start < timeoutMs) {
    if (!Serial.available()) continue;
    char c = Serial.read();
    if (c == '\r') continue;
    if (c == '\n') {
      line[n] = 0;
      if (strncmp(line, "EVT", 3) == 0) { n = 0; continue; }
      return true;
    }
    if (n < sizeof(line) - 1) line[n++] = c;
  }
  return false;
}

// The value of key=... in the reply, copied into out.
bool field(const char *key, char *out, size_t len) {
  char pat[24];
  snprintf(pat, sizeof(pat), " %s=", key);
  const char *p = strstr(line, pat);
  if (!p) return false;
  p += strlen(pat);
  size_t i = 0;
  while (*p && *p != ' ' && i < len - 1) out[i++] = *p++;
  out[i] = 0;
  return true;
}

void blink(int times) {
  for (int i = 0; i < times; i++) {
    digitalWrite(LED_PIN, HIGH); delay(120);
    digitalWrite(LED_PIN, LOW); delay(120);
  }
}

void loop() {
  if (digitalRead(LEARN_PIN) == LOW) {
    learned++;
    Serial.print("LEARN obj");
    Serial.print(learned);
    Serial.println(" 5");
    // Learning 5 frames and refitting takes a few seconds on a Pi.
    if (readReply(30000) && strncmp(line, "OK", 2) == 0) blink(2); else blink(6);
    delay(300);
  }
  if (digitalRead(CLASSIFY_PIN) == LOW) {
    Serial.println("CLASSIFY");
    char label[32];
    if (readReply(10000) && strncmp(line, "OK", 2) == 0 && field("label", label, sizeof(label))) {
      if (strcmp(label, TARGET) == 0) digitalWrite(LED_PIN, HIGH);
      else if (strcmp(label, "unknown") == 0) blink(3);
      else digitalWrite(LED_PIN, LOW);
    } else {
      blink(6);  // ERR 409: learn two classes first; ERR 503: camera problem
    }
    delay(300);
  }
}
